// Hot CPU loops compiled twice: an AVX2 / FMA clone (x86-64-v3) and the baseline, the right one
// picked once when the library loads (an ifunc). Elsewhere the attribute is empty.
#pragma once

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define FUSED_NCE_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define FUSED_NCE_CLONES
#endif
