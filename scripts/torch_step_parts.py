"""PyTorch's forward+backward times of the head step's parts (2 threads), beside
`cargo run --release --example step_parts` (burn's Flex) on the same shapes. The edge and node
updates are stand-ins with the release's operations and shapes (E = 81*81 edges, d = 512),
not the release's modules."""
import statistics, time, torch, torch.nn as nn, torch.nn.functional as F
torch.set_num_threads(2); torch.manual_seed(0)
N, D = 81, 512; E = N * N
def median(f):
    f(); ts = []
    for _ in range(5):
        t = time.perf_counter(); f(); ts.append(time.perf_counter() - t)
    return statistics.median(ts)
def report(name, both):
    print(f"{name:<34} forward+backward {both:.4f} s")
def pair(name, fn, up, *inputs):
    report(name, median(lambda: (fn(*inputs) * up).sum().backward()))
xe = torch.randn(E, D, requires_grad=True); xe4 = torch.randn(E, 4 * D, requires_grad=True)
up4 = torch.randn(E, 4 * D); up1 = torch.randn(E, D)
pair("linear E x d -> 4d", nn.Linear(D, 4 * D), up4, xe)
pair("linear E x 4d -> d", nn.Linear(4 * D, D), up1, xe4)
w = torch.randn(D, 4 * D, requires_grad=True)
pair("matmul E x d x 4d", lambda a: a @ w, up4, xe)
pair("layer norm E x 4d", nn.LayerNorm(4 * D), up4, xe4)
pair("gelu E x 4d", nn.GELU(), up4, xe4)
pair("mul+sum E x 4d", lambda a: a * up4, torch.ones(E, 4 * D), xe4)
e3 = torch.randn(N, N, D, requires_grad=True); fo = torch.randn(N, D, 1, requires_grad=True)
pair("batched N x (N x d x 1)", lambda a, b: a @ b, torch.randn(N, N, 1), e3, fo)
f2 = torch.randn(N, D, requires_grad=True)
pair("broadcast mul + sum_dim", lambda a, b: (a * b.unsqueeze(0)).sum(2), torch.ones(N, N), e3, f2)

class Edge(nn.Module):  # the release's edge model: attention over the two endpoint tokens + MLP
    def __init__(s):
        super().__init__(); s.n2e = nn.Linear(D, D); s.q = nn.Linear(D, D); s.k = nn.Linear(D, D); s.v = nn.Linear(D, D)
        s.mlp = nn.Sequential(nn.Linear(D, 4 * D), nn.GELU(), nn.LayerNorm(4 * D), nn.Linear(4 * D, D)); s.norm = nn.LayerNorm(D)
        s.drop = nn.Dropout(0.1)
    def forward(s, h, e):
        t = F.gelu(s.n2e(h)); src = t.repeat_interleave(N, 0); dst = t.repeat(N, 1)
        tok = torch.stack([src, dst], 1)                       # [E, 2, d]
        q = s.q(e).unsqueeze(1); k = s.k(tok); v = s.v(tok)
        a = s.drop(torch.softmax((q * k).sum(-1) / D ** 0.5, -1)).unsqueeze(-1)
        e1 = s.norm(F.gelu((a * v).sum(1) + e))
        return s.norm(F.gelu(s.mlp(e1) + e1))
class Node(nn.Module):
    def __init__(s):
        super().__init__(); s.att = nn.MultiheadAttention(D, 4, batch_first=True); s.e2n = nn.Linear(D, D)
        s.l1 = nn.Linear(D, 4 * D); s.l2 = nn.Linear(4 * D, D); s.norm = nn.LayerNorm(D)
    def forward(s, h, e, mask):
        a, _ = s.att(h.unsqueeze(0), h.unsqueeze(0), h.unsqueeze(0), attn_mask=mask)
        h1 = s.norm(F.gelu(h + a[0]))
        m = F.gelu(s.e2n(e)).view(N, N, D).sum(1)
        h2 = s.norm(F.gelu(h1 + m))
        return s.norm(F.gelu(h2 + s.l2(F.gelu(s.l1(h2)))))
h = torch.randn(N, D, requires_grad=True); e = torch.randn(E, D, requires_grad=True)
edge = Edge().train(); node = Node().train()
pair("edge update", edge, up1, h, e)
mask = (torch.arange(N)[:, None] % 27 == torch.arange(N)[None] % 27)
pair("node update", lambda a, b: node(a, b, mask), torch.randn(N, D), h, e)
