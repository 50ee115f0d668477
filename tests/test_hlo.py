"""HLO text parsing: trip counts, loop multipliers, FLOP conventions, replica groups."""

import pytest

from capibara_export.analysis.collectives import axis_of, parse_groups
from capibara_export.analysis.hlo import HloProgram, scope

LOOP = """HloModule m

%body (p: (s32[], f32[8,16])) -> (s32[], f32[8,16]) {
  %p = (s32[], f32[8,16]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = f32[8,16]{1,0} get-tuple-element(%p), index=1
  %w = f32[16,16]{1,0} constant({...})
  %d = f32[8,16]{1,0} dot(%x, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}, metadata={op_name="jit(f)/vision/while/body/closed_call/mlp/dot_general"}
  %step = s32[] constant(STEP)
  %n = s32[] add(%i, %step)
  ROOT %t = (s32[], f32[8,16]) tuple(%n, %d)
}

%cond (p: (s32[], f32[8,16])) -> pred[] {
  %p = (s32[], f32[8,16]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %limit = s32[] constant(LIMIT)
  ROOT %lt = pred[] compare(%i, %limit), direction=LT
}

ENTRY %main (a: f32[8,16]) -> f32[8,16] {
  %a = f32[8,16]{1,0} parameter(0)
  %zero = s32[] constant(START)
  %t = (s32[], f32[8,16]) tuple(%zero, %a)
  %w = (s32[], f32[8,16]) while(%t), condition=%cond, body=%body BACKEND
  ROOT %r = f32[8,16]{1,0} get-tuple-element(%w), index=1
}
"""


def loop_module(start=0, limit=12, step=1, backend=""):
    return (LOOP.replace("START", str(start)).replace("LIMIT", str(limit)).replace("STEP", str(step))
            .replace("BACKEND", backend))


@pytest.mark.parametrize("start, limit, step, trips", [(0, 12, 1, 12), (1, 20, 1, 19), (0, 16, 2, 8), (0, 15, 2, 8)])
def test_trip_count_from_the_loop_condition(start, limit, step, trips):
    program = HloProgram(loop_module(start, limit, step))
    (loop,) = program.loops
    assert (loop.trip_count, loop.source) == (trips, "condition")
    dot_flops = 2 * 8 * 16 * 16
    assert program.costs(loop_corrected=True).matmul_flops == trips * dot_flops
    assert program.costs(loop_corrected=False).matmul_flops == dot_flops


def test_known_trip_count_wins_over_the_condition():
    program = HloProgram(loop_module(0, 12, 1, ', backend_config={"known_trip_count":{"n":"5"}}'))
    assert program.loops[0].trip_count == 5 and program.loops[0].source == "known_trip_count"


def test_scope_strips_jax_internals():
    assert scope("jit(fn)/text_decoder/while/body/closed_call/self_attention/dot_general") == \
        "text_decoder/self_attention"
    assert scope("jit(fn)/transpose(jvp(vision))/vision_blocks/while/body/mlp/dot_general") == \
        "vision/vision_blocks/mlp"
    assert scope("") == "(unattributed)"


BATCHED_CONV = """HloModule m

ENTRY %main (q: bf16[32,577,12,64], k: bf16[32,577,12,64]) -> f32[32,12,577,577] {
  %q = bf16[32,577,12,64]{3,2,1,0} parameter(0)
  %k = bf16[32,577,12,64]{3,2,1,0} parameter(1)
  ROOT %s = f32[32,12,577,577]{3,2,1,0} convolution(%q, %k), window={size=32x12 stride=31x11 lhs_dilate=32x12}, dim_labels=0b1f_0o1i->01bf
}
"""


def test_batched_matmul_written_as_dilated_convolution_counts_one_tap():
    """TPU HLO writes attention scores as a convolution over dilated batch dims; only one
    window tap per output is real, so the FLOPs are those of the batched matmul."""
    program = HloProgram(BATCHED_CONV)
    assert program.costs().matmul_flops == pytest.approx(2 * 32 * 12 * 577 * 577 * 64)


CUBLAS_GEMM = """HloModule m

ENTRY %main (a: bf16[32,768], b: bf16[768,3072]) -> bf16[32,3072] {
  %a = bf16[32,768]{1,0} parameter(0)
  %b = bf16[768,3072]{1,0} parameter(1)
  %g = (bf16[32,3072]{1,0}, s8[4194304]{0}) custom-call(%a, %b), custom_call_target="__cublas$gemm", backend_config={"gemm_backend_config":{"alpha_real":1,"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"],"lhs_batch_dimensions":[],"rhs_batch_dimensions":[]}}}
  ROOT %r = bf16[32,3072]{1,0} get-tuple-element(%g), index=0
}
"""


def test_gpu_cublas_gemm_custom_call_counts_as_a_matmul():
    """GPU HLO hands matmuls to cuBLAS as custom-calls; the workspace leaf is not output."""
    assert HloProgram(CUBLAS_GEMM).costs().matmul_flops == 2 * 32 * 3072 * 768


@pytest.mark.parametrize("text, groups", [
    ("{{0,1,2,3},{4,5,6,7}}", [[0, 1, 2, 3], [4, 5, 6, 7]]),
    ("[2,4]<=[8]", [[0, 1, 2, 3], [4, 5, 6, 7]]),
    ("[4,2]<=[2,4]T(1,0)", [[0, 4], [1, 5], [2, 6], [3, 7]]),
    ("mesh['axis_0'=2,'axis_1'=4] {'axis_1'}", [[0, 1, 2, 3], [4, 5, 6, 7]]),
    ("mesh['axis_0'=2,'axis_1'=4] {'axis_0'}", [[0, 4], [1, 5], [2, 6], [3, 7]]),
])
def test_replica_group_notations(text, groups):
    assert parse_groups(text, 8) == groups


def test_groups_map_to_mesh_axes():
    assert axis_of([[0, 1, 2, 3], [4, 5, 6, 7]], (2, 4)) == ("model", 4)
    assert axis_of([[0, 4], [1, 5]], (2, 4)) == ("data", 2)
    assert axis_of([list(range(8))], (2, 4)) == ("data+model", 8)
    assert axis_of([[3]], (2, 4)) == ("none", 1)


def test_mesh_groups_with_a_device_order():
    """CPU HLO: mesh['axis_0'=1,'axis_1'=8,'axis_2'=4], device_ids=([4,8]T(1,0)) {'axis_1'} are
    the rows of a 4x8 device grid."""
    groups = parse_groups("mesh['axis_0'=1,'axis_1'=8,'axis_2'=4], device_ids=([4,8]T(1,0)) {'axis_1'}", 32)
    assert groups[0] == list(range(8)) and groups[3] == list(range(24, 32))
    assert axis_of(groups, (4, 8)) == ("model", 8)


FUSED = """HloModule m

%fused_computation.clone (p0: f32[64,64]) -> f32[64,64] {
  %p0 = f32[64,64]{1,0} parameter(0)
  %c = bf16[64,64]{1,0} convert(%p0)
  %m = bf16[64,64]{1,0} multiply(%c, %c)
  ROOT %back = f32[64,64]{1,0} convert(%m)
}

ENTRY %main (a: f32[64,64]) -> f32[64,64] {
  %a = f32[64,64]{1,0} parameter(0)
  ROOT %f = f32[64,64]{1,0} fusion(%a), kind=kLoop, calls=%fused_computation.clone, metadata={op_name="jit(fn)/text_decoder/while/body/closed_call/mlp/mul"}
}
"""


def test_instructions_without_metadata_take_their_callers_scope():
    """XLA clones fusions without metadata (a decode step's casts on TPU were 77% of its FLOPs
    "unattributed"): their instructions take the scope of the fusion that calls them."""
    from capibara_export.analysis.hotspots import by_scope, by_tower, scope_totals

    program = HloProgram(FUSED)
    scopes = {program.scope_of(c, i) for c, i, _ in program.instructions() if c.name == "fused_computation.clone"}
    assert scopes == {"text_decoder/mlp"}
    (row,) = [r for r in by_scope(scope_totals(program, [])) if r["flops"]]
    assert row["scope"] == "text_decoder/mlp" and row["flops_share"] == 1.0
    (tower,) = [r for r in by_tower(scope_totals(program, [])) if r["flops"]]
    assert tower["scope"] == "text_decoder" and tower["flops"] == row["flops"]
    assert scope("jit(fn)/text_decoder/lm_head/btd,vd->btv/dot_general") == "text_decoder/lm_head"


TRITON_CALL = """HloModule m

ENTRY %main (q: bf16[1,1,12,64], kv: bf16[1,577,2,12,64]) -> bf16[1,1,12,64] {
  %q = bf16[1,1,12,64]{3,2,1,0} parameter(0)
  %kv = bf16[1,577,2,12,64]{4,3,2,1,0} parameter(1)
  ROOT %pallas_call.1 = bf16[1,1,12,64]{3,2,1,0} custom-call(%q, %kv, %kv), custom_call_target="__gpu$xla.gpu.triton", backend_config={"name":"decode_attention"}
}
"""


def test_a_buffer_passed_twice_is_read_once():
    """The Pallas decode-attention kernel takes the fused KV cache as both its keys and its
    values operand; the traffic is the cache once, plus the query and the output."""
    kernel, = HloProgram(TRITON_CALL).kernel_profile().kernels
    assert kernel.bytes == 2 * (577 * 2 * 12 * 64 + 2 * 12 * 64)


# The TPU compiler's shape of a scanned layer's weight read: the fusion that uses one layer's
# weight takes the whole 12-layer stack and slices it in a nested fusion (decode_step,
# replicated fp32, copy_bitcast_fusion.4 of the default build).
NESTED_SLICE = """HloModule nested

%sum (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%slice_layer (p0: f32[12,64,128], p1: s32[]) -> f32[1,64,128] {
  %p0 = f32[12,64,128]{2,1,0} parameter(0)
  %p1 = s32[] parameter(1)
  %zero = s32[] constant(0)
  ROOT %ds = f32[1,64,128]{2,1,0} dynamic-slice(%p0, %p1, %zero, %zero), dynamic_slice_sizes={1,64,128}
}

%use_layer (q0: f32[12,64,128], q1: s32[], q2: f32[12,64,128]) -> f32[64,128] {
  %q0 = f32[12,64,128]{2,1,0} parameter(0)
  %q1 = s32[] parameter(1)
  %q2 = f32[12,64,128]{2,1,0} parameter(2)
  %layer = f32[1,64,128]{2,1,0} fusion(%q0, %q1), kind=kLoop, calls=%slice_layer
  %flat = f32[64,128]{1,0} bitcast(%layer)
  %init = f32[] constant(0)
  %whole = f32[64,128]{1,0} reduce(%q2, %init), dimensions={0}, to_apply=%sum
  ROOT %both = f32[64,128]{1,0} add(%flat, %whole)
}

ENTRY %main (w: f32[12,64,128], i: s32[], v: f32[12,64,128]) -> f32[64,128] {
  %w = f32[12,64,128]{2,1,0} parameter(0)
  %i = s32[] parameter(1)
  %v = f32[12,64,128]{2,1,0} parameter(2)
  ROOT %fusion = f32[64,128]{1,0} fusion(%w, %i, %v), kind=kLoop, calls=%use_layer
}
"""


def test_a_stacked_weight_sliced_in_a_nested_fusion_is_read_one_layer_at_a_time():
    """The stack `w` is only sliced (inside the nested fusion): one layer's 32 KiB is read, not
    the 384 KiB stack; `v`, which a reduce reads whole, counts whole; plus the index and output."""
    (kernel,) = [k for k in HloProgram(NESTED_SLICE).kernel_profile().kernels if k.name == "fusion"]
    layer = 64 * 128 * 4
    assert kernel.bytes == layer + 12 * layer + 4 + layer


@pytest.mark.parametrize("text, logical, moved", [
    # the decoder's cross-attention cache slice: 64 lanes pad to 128, 12 rows to 16
    ("bf16[1,577,2,12,64]{4,3,2,1,0:T(8,128)(2,1)S(3)}", 1 * 577 * 2 * 12 * 64 * 2, 1 * 577 * 2 * 16 * 128 * 2),
    # a layout that is not row-major pads its own two most-minor dimensions
    ("f32[32,577,768]{1,2,0:T(8,128)}", 32 * 577 * 768 * 4, 32 * 640 * 768 * 4),
    # a 1-D tile, and a tuple of leaves each with its own tiling
    ("(f32[32]{0:T(128)S(3)}, bf16[1,32,768]{2,1,0:T(8,128)(2,1)})", 32 * 4 + 32 * 768 * 2, 128 * 4 + 32 * 768 * 2),
    # no tiles (CPU and GPU layouts) and an exact fit: the logical size
    ("f32[16,64]{1,0}", 16 * 64 * 4, 16 * 64 * 4),
    ("bf16[8,128]{1,0:T(8,128)(2,1)}", 8 * 128 * 2, 8 * 128 * 2),
])
def test_a_tiled_layout_moves_the_bytes_its_tiles_hold(text, logical, moved):
    from capibara_export.analysis.hlo_text import Shape

    shape = Shape.parse(text)
    assert shape.bytes == logical and shape.moved_bytes == moved
