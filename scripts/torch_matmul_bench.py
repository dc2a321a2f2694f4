"""PyTorch's matrix-product throughput on the head step's largest shapes, 2 threads, beside
`cargo run --release --example matmul_bench` (burn's Flex). Prints GFLOP/s per shape and
layout (a^T / b^T: that operand is a transposed view)."""
import torch, time
torch.set_num_threads(2)
def bench(m,k,n,ta,tb):
    a = torch.ones(k,m).t() if ta else torch.ones(m,k)
    b = torch.ones(n,k).t() if tb else torch.ones(k,n)
    ts=[]
    for _ in range(6):
        t=time.perf_counter(); c=a@b; ts.append(time.perf_counter()-t)
    ts.sort(); return 2*m*n*k/ts[2]/1e9
for (m,k,n) in [(6561,512,2048),(6561,2048,512),(2048,6561,512),(1024,1024,1024)]:
    for ta,tb in [(False,False),(True,False),(False,True)]:
        print(f"m={m} k={k} n={n} a^T={ta} b^T={tb}: {bench(m,k,n,ta,tb):.1f} GFLOP/s (torch, {torch.get_num_threads()} threads)")
torch.set_num_threads(1)
print(f"6561x512x2048 single thread: {bench(6561,512,2048,False,False):.1f} GFLOP/s")
