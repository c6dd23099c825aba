"""Eager against torch.compile'd frozen SmolLM2: forward + backward to a [32, 32, 576] prefix, 12 caption tokens,
bf16 autocast, paired rounds in one process. Session 12, see README.md."""
import time, statistics, sys, torch, torch.nn.functional as F
from pformer.llm import FrozenLLM
from dvlp_common.cpu_kernels import install_cpu_attention
from dvlp_common.memory import keep_freed_memory
keep_freed_memory()
install_cpu_attention(128, use_bit_dropout=True)
torch.manual_seed(0)
dtype = torch.bfloat16
llm = FrozenLLM.load("smollm2-135m", dtype=dtype, bos_before_prefix=True)
B, P, T = 32, 32, 12
prefix = torch.randn(B, P, llm.hidden_size) * 0.1
ids = torch.randint(100, 5000, (B, T)); mask = torch.ones(B, T, dtype=torch.long)
def step(model_call):
    x = prefix.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=dtype):
        out = model_call(x)
    out.backward()
    return x.grad
eager = lambda x: llm.prefix_lm(x, ids, mask).loss
print(torch.get_num_threads(), "threads")
for _ in range(2): step(eager)
compiled_model = torch.compile(llm.model)
plain = llm.model
def comp(x):
    llm.model = compiled_model
    try: return llm.prefix_lm(x, ids, mask).loss
    finally: llm.model = plain
t0 = time.perf_counter(); step(comp); print("compile+first", time.perf_counter() - t0, flush=True)
t0 = time.perf_counter(); step(comp); print("second", time.perf_counter() - t0, flush=True)
ge, gc = step(eager), step(comp)
print("grad max diff", (ge - gc).abs().max().item(), ge.abs().max().item())
te, tc = [], []
for r in range(8):
    for name, f, lst in (("e", eager, te), ("c", comp, tc))[:: (1 if r % 2 == 0 else -1)]:
        t0 = time.perf_counter(); step(f); lst.append(time.perf_counter() - t0)
print("eager", statistics.median(te), "compiled", statistics.median(tc), "ratio", statistics.median([a / b for a, b in zip(te, tc)]))
