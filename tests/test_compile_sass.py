"""Unit tests for ``triton_kernels.compile_sass.ptx_weight_loads`` on hand-written PTX.

The compile check attributes a global load to the packed weights when its address is computed from the
weight pointer parameter. These cases pin down the two ways that went wrong: an address that Triton
moves through shared memory (a layout conversion of a gathered pointer tensor) lost its provenance, and a
load indexed by *data* (a codebook table read by decoded codes) must not count as a weight load.
"""
from triton_kernels.compile_sass import ptx_weight_loads

_HEAD = """
.visible .entry k(
	.param .u64 k_param_0,
	.param .u64 k_param_1,
	.param .u64 k_param_2
)
{
	ld.param.b64 	%rd1, [k_param_0];
	ld.param.b64 	%rd2, [k_param_1];
	ld.param.b64 	%rd3, [k_param_2];
"""


def test_direct_vector_load_counts_for_its_parameter():
    ptx = _HEAD + """
	mul.wide.s32 	%rd4, %r1, 16;
	add.s64 	%rd5, %rd2, %rd4;
	@%p1 ld.global.v4.b32 { %r2, %r3, %r4, %r5 }, [ %rd5 + 0 ];
	ld.global.b16 { %rs1 }, [ %rd1 + 0 ];
}
"""
    assert ptx_weight_loads(ptx, (1,)) == [128]
    assert ptx_weight_loads(ptx, (0,)) == [16]


def test_address_through_shared_memory_keeps_its_parameter():
    # activation sparsity: W^T + kidx * stride is computed in one layout, stored to shared memory and
    # read back in the load's layout
    ptx = _HEAD + """
	ld.global.b32 { %r1 }, [ %rd3 + 0 ];
	cvt.s64.s32 	%rd6, %r1;
	shl.b64 	%rd7, %rd6, 1;
	add.s64 	%rd8, %rd2, %rd7;
	st.shared.b64 [ %r9 + 0 ], %rd8;
	bar.sync 	0;
	ld.shared.b64 	%rd9, [%r10];
	add.s64 	%rd10, %rd9, %rd7;
	@%p4 ld.global.v4.b32 { %r28, %r29, %r30, %r31 }, [ %rd10 + 0 ];
}
"""
    assert ptx_weight_loads(ptx, (1,)) == [128]
    assert ptx_weight_loads(ptx, (2,)) == [32]  # the index list itself, not the gather it feeds


def test_load_indexed_by_loaded_data_is_not_a_weight_load():
    # codebook lookup: codes come from the packed weights (param 1), the table from param 0
    ptx = _HEAD + """
	ld.global.v2.b32 { %r1, %r2 }, [ %rd2 + 0 ];
	and.b32 	%r3, %r1, 15;
	mul.wide.u32 	%rd4, %r3, 2;
	add.s64 	%rd5, %rd1, %rd4;
	ld.global.b16 { %rs1 }, [ %rd5 + 0 ];
}
"""
    assert ptx_weight_loads(ptx, (1,)) == [64]
    assert ptx_weight_loads(ptx, (0,)) == [16]


def test_shared_memory_flow_is_per_width():
    # a 16-bit value stored to shared memory does not taint 64-bit shared loads
    ptx = _HEAD + """
	ld.global.b16 { %rs1 }, [ %rd2 + 0 ];
	st.shared.b16 [ %r1 + 0 ], %rs1;
	st.shared.b64 [ %r2 + 0 ], %rd1;
	ld.shared.b64 	%rd6, [%r3];
	ld.global.b32 { %r4 }, [ %rd6 + 0 ];
}
"""
    assert ptx_weight_loads(ptx, (1,)) == [16]
    assert ptx_weight_loads(ptx, (0,)) == [32]
