import torch, time, statistics, lnsr
from lnsr.benchmarks.step import build_model, make_batch
from lnsr.twopass import two_pass
torch.set_num_threads(2)
model, dec = build_model("bert-base"); model.train()
batch = make_batch(model.config.vocab_size, 8, 128, dec, "cpu")
opt = torch.optim.SGD(model.parameters(), lr=0.0)
def run(method):
    reg = None
    if method.startswith("lnsr"):
        reg = lnsr.LNSR(model, sigma=0.05, inject_at=6, lam=0.01, dropout=method.split(":")[1])
    t0 = time.perf_counter()
    if method == "two-pass":
        out, p = two_pass(model, batch, seed=123, sigma=0.05, inject_at=6); loss = out.loss + 0.01 * p
    else:
        out = model(**batch); loss = out.loss + (reg.loss if reg else 0)
    t1 = time.perf_counter()
    loss.backward(); opt.zero_grad(set_to_none=True)
    t2 = time.perf_counter()
    if reg: reg.remove()
    return t1 - t0, t2 - t1
res = {m: [] for m in ("two-pass", "lnsr:paired", "lnsr:independent", "plain")}
for rep in range(4):
    for m in res:
        r = run(m)
        if rep: res[m].append(r)
for m, v in res.items():
    print(f"{m:18s} fwd {statistics.median(x[0] for x in v)*1e3:8.0f} ms  bwd {statistics.median(x[1] for x in v)*1e3:8.0f} ms")
