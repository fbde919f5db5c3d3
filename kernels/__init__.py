"""Triton kernels, installed as tokpost_fast.kernels (never as a top-level `kernels` module).

nearest_codes.knn_codes_triton and perturb_codes.perturb_codes_triton implement the contracts of docs/INTERFACES.md.
Nothing is imported here: TRITON_INTERPRET must be set before a kernel module is imported, and importing triton
lazily keeps `import tokpost_fast` working where triton is absent.
"""
