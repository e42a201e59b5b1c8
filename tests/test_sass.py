"""clq_triton.kernels.sass: the K loop of a GEMM found in SASS text from its branches alone
(the compile test runs it on real cubins; here on hand-written SASS with known answers)."""

from clq_triton.kernels import sass

_SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   LDG.E R2, desc[UR4][R4.64] ;
        /*0020*/                   LOP3.LUT R5, R2, 0xf0f0f0f0, RZ, 0xc0, !PT ;
        /*0030*/                   IMAD.SHL.U32 R6, R2, 0x10, RZ ;
        /*0040*/                   IGMMA.64x128x32.S8.S8 R24, R88, gdesc[UR4], RZ, !UPT, gsb0 ;
        /*0050*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        /*0060*/                   IGMMA.64x128x32.S8.S8 R24, R92, gdesc[UR8], R24, gsb0 ;
        /*0070*/                   ISETP.GE.AND P0, PT, R7, R8, PT ;
        /*0080*/              @!P0 BRA 0x20 ;
        /*0090*/                   I2FP.F32.S32 R9, R24 ;
        /*00a0*/                   @P1 BRA 0xc0 ;
        /*00b0*/                   FADD R10, R9, R9 ;
        /*00c0*/                   BRA 0x90 ;
        /*00d0*/                   EXIT ;
"""


def test_the_tensor_loop_is_the_backward_branch_around_the_mmas():
    loop = sass.tensor_loop(_SASS)
    assert loop is not None
    assert (loop.instructions, loop.tensor) == (7, 2)  # 0x20 .. 0x80, predicates dropped
    assert loop.ops["IGMMA"] == 2 and loop.ops["LOP3"] == 1 and loop.ops["BRA"] == 1
    # a loop without tensor-core instructions (0x90 .. 0xc0) is not the K loop
    assert sass.tensor_loop(_SASS.replace("IGMMA", "IADD3")) is None


def test_instructions_per_gmma_counts_macs_per_warpgroup():
    loop = sass.Loop(instructions=170, tensor=8)
    # 128×256×128 with 8 warps: two warpgroups, each 64×256×128 = 8 × 64×128×32
    assert sass.instructions_per_gmma(loop, 128, 256, 128, 8) == 170 / 8
    # one warpgroup of 64×128×64 = 2 × 64×128×32
    assert sass.instructions_per_gmma(sass.Loop(311, 2), 64, 128, 64, 4) == 311 / 2
