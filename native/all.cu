// The single translation unit nvcc compiles into moe4j.fatbin: every kernel family of native/.
#include "elementwise.cu"
#include "layernorm.cu"
#include "softmax.cu"
#include "attention.cu"
#include "rows.cu"
#include "moe.cu"
#include "grouped_gemm.cu"
#include "attention_fa2.cu"
