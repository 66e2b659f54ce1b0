"""glmc: a compiler for GLM-family language models.

passes/ and backends/ live at the top of the repository but install as
glmc.passes and glmc.backends, so nothing named plain `passes` or `backends`
lands in site-packages.
"""

from setuptools import setup

CPU16 = ["apache-tvm==0.27.0", "apache-tvm-ffi==0.1.14.post1"]
# glmc's cpu kernels (quantized linears by default, 16-bit weights, decode attention) are
# x86 AVX2 code built by TVM: installed with glmc where they can run; elsewhere
# `pip install 'glmc[cpu16]'` asks for them and int4 / int8 builds default to MatMulNBits
X86_LINUX = "; platform_machine == 'x86_64' and sys_platform == 'linux'"

setup(
    name="glmc",
    version="0.1.0",
    description="Compiler for GLM-family language models (CPU via ONNX Runtime; CUDA/ROCm via Triton)",
    python_requires=">=3.10",
    packages=["glmc", "glmc.ops", "glmc.passes", "glmc.backends", "glmc.backends.cpu", "glmc.backends.gpu",
              "glmc.backends.triton"],
    package_dir={"glmc": "glmc", "glmc.passes": "passes", "glmc.backends": "backends"},
    install_requires=[
        "torch>=2.6",
        "transformers>=5.0,<6",
        "onnx>=1.17",
        "onnxscript>=0.3",
        "onnxruntime>=1.20",
        "safetensors>=0.4",
        "tokenizers>=0.20",
        "sentencepiece>=0.2",      # ChatGLM2/3 tokenizer.model
        "tiktoken>=0.7",           # GLM-4 tokenizer.model (ranks file)
        "jinja2>=3.1",             # checkpoints' chat_template
        "fastapi>=0.110",          # glmc serve
        "uvicorn>=0.29",
        "numpy>=1.26",
        "click>=8.1",
        "rich>=13",
        "matplotlib>=3.7",
        "triton>=3.2",
        *(requirement + X86_LINUX for requirement in CPU16),
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-benchmark>=4", "pytest-xdist>=3.5", "hypothesis>=6", "peft>=0.13",
                 "openai>=1.30", "httpx>=0.27", "gguf>=0.17", *CPU16],
        "gpu": ["triton>=3.2"],
        # glmc's TVM cpu kernels on other platforms (apache-tvm-ffi 0.1.15.x segfaults in
        # save_json: pinned)
        "cpu16": CPU16,
        "peers": ["onnxruntime-genai>=0.18", "llama-cpp-python>=0.3.36", "gguf>=0.17"],
    },
    entry_points={"console_scripts": ["glmc=glmc.cli:main"]},
)
