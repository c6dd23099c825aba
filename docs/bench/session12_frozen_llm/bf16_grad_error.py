"""Relative error of the bf16 gradient w.r.t. a visual prefix through the frozen SmolLM2 (fp32 = reference), with
our CPU attention by matmuls (max keys 128) and with torch's SDPA (0). Session 12, see README.md."""
import torch

from pformer.llm import FrozenLLM
from dvlp_common.cpu_kernels import install_cpu_attention
torch.manual_seed(0)
B, P = 8, 32
llm32 = FrozenLLM.load("smollm2-135m", dtype=torch.float32, bos_before_prefix=True)
llm16 = FrozenLLM.load("smollm2-135m", dtype=torch.bfloat16, bos_before_prefix=True)
caps = ["a small red circle above a large blue square", "two green triangles to the left of a yellow star",
        "a purple square below a small orange circle", "a large grey star next to a red triangle"] * 2
ids, mask = llm32.tokenize_targets(caps, 20)
# a realistic prefix: embeddings of real caption tokens (shuffled captions) plus noise
src = torch.cat([llm32.tokenize_targets(caps[::-1], 40)[0]] * 4, 1)
with torch.no_grad():
    prefix = llm32.embed(src[:B, :P].clamp(min=0)).float() + 0.02 * torch.randn(B, P, 576)
def grad(llm, autocast):
    x = prefix.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = llm.prefix_lm(x, ids, mask).loss
    loss.backward()
    return x.grad.float(), loss.item()
rel = lambda a, b: ((a - b).norm() / b.norm()).item()
install_cpu_attention(128, use_bit_dropout=True)
ref, l = grad(llm32, False)
print(f"fp32 loss {l:.4f}")
for keys in (128, 0):
    install_cpu_attention(keys, use_bit_dropout=True)
    g, l16 = grad(llm16, True)
    print(f"bf16 matmul_max_keys={keys}: loss {l16:.4f} grad rel {rel(g, ref):.4f}", flush=True)
