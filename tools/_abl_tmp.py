import sys, os
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch, triton.testing
from ssa_megatron.ops import triton_selection as tsel, triton_sparse_attention as tsp
for (hq, h, d) in [(32, 2, 64), (32, 8, 128)]:
    b, t = 4, 8192
    q = torch.randn(b, t, hq, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(b, t, h, d, device="cuda", dtype=torch.bfloat16)
    idx = tsel.select_blocks(q, k, 16, 16).reshape(b*t, h, 16)
    bstart, blen, nb, tok_boff = tsp._blocks(tsel.doc_offsets(b, t, None), 16, q.device)
    ms = triton.testing.do_bench(lambda: tsp._invert(idx, tok_boff, nb)); print(f"D{d} H{h} invert {ms:.3f} ms", flush=True)
