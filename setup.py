from setuptools import setup, find_packages

setup(
    name="cm_fused",
    version="0.1.0",
    description="Adam with Critical Momenta for PyTorch: fused C++ CPU and Triton CUDA steps",
    packages=find_packages(include=["cm_fused", "cm_fused.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.4"],
    extras_require={"triton": ["triton>=3.0"], "test": ["pytest", "hypothesis"]},
)
