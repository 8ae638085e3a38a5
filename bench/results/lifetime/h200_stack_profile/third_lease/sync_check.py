# Does `t[idx] = 0` on a CUDA tensor wait for queued GPU work, where index_fill_ does not?
import time, torch
t = torch.zeros(65, 16, dtype=torch.int32, device="cuda")
idx = torch.tensor([1, 5, 9], device="cuda")
a = torch.randn(4096, 4096, device="cuda")
def queued(n=40):
    for _ in range(n):
        a @ a
def host_ms(fn):
    torch.cuda.synchronize(); queued(); start = time.perf_counter(); fn(); ms = (time.perf_counter() - start) * 1e3
    torch.cuda.synchronize(); return ms
queued(); torch.cuda.synchronize()
start = time.perf_counter(); queued(); torch.cuda.synchronize(); gpu = (time.perf_counter() - start) * 1e3
for name, fn in [("setitem", lambda: t.__setitem__(idx, 0)), ("index_fill_", lambda: t.index_fill_(0, idx, 0))] * 3:
    print(f"{name}: host {host_ms(fn):.3f} ms with {gpu:.1f} ms of GPU work queued")
