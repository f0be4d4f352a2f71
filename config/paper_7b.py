# The paper's 6.7B model and optimizer settings (Su et al. 2024): LLaMA block,
# d_model 4096, 32 layers, 32 heads, FFN 11008, context 2048, global batch 2048 sequences, 25000 optimizer steps,
# AdamW 3e-4 (0.9, 0.95), weight decay 0.1 (not on norms), clip 1.0, cosine to 0 after 2000 warm-up steps, bf16.
# The global batch is reached through gradient accumulation over all GPUs (a multiple of their number; a
# --batch_size flag keeps the 2048 sequences a step). FSDP2 shards parameters, gradients and AdamW's state:
#     torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 train.py config/paper_7b.py
# The paper trained on the Pile with the LLaMA tokenizer (vocab 32000); here the corpus is FineWeb-Edu (or the Pile,
# or local files) with GPT-2's BPE (vocab 50257), prepared first with data/fineweb/prepare.py (see its docstring).
out_dir = "out-paper-7b"
dataset = "fineweb"
arch = "llama"
n_layer = 32
n_head = 32
n_embd = 4096
n_ffn = 11008
block_size = 2048
dropout = 0.0
batch_size = 4  # sequences per micro-batch per GPU
gradient_accumulation_steps = 2048 // batch_size  # 2048 sequences per optimizer step
learning_rate = 3e-4
min_lr = 0.0
beta1 = 0.9
beta2 = 0.95
weight_decay = 0.1
grad_clip = 1.0
warmup_iters = 2000
max_iters = 25000
lr_decay_iters = 25000
eval_interval = 1000
# a checkpoint every 40 steps: a hard kill (a lost node) costs at most ~26 min of 16 H100s at 30% MFU, ~15 at
# 50% [est: 1.8e17 FLOP a step, docs/distributed.md]; each save writes about 5 GB a GPU
checkpoint_interval = 40
eval_iters = 50
log_interval = 10
compile = True
parallel = "fsdp"  # DDP would hold 16 bytes a parameter in every GPU (weights, gradients, AdamW): 110 GB, 176 GiB at the peak with the activations (plan.py)
# the loss path: the (B, T, V) logits whole and compiled with the model when they fit, else chunks
# (mile.choose_loss_path, docs/chunked.md); --loss_path=chunked forces the memory-lean chunks
loss_path = "auto"
