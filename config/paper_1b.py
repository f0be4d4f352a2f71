# The paper's 1.2B model and optimizer settings (Su et al. 2024): LLaMA block,
# d_model 2048, 16 layers, 8 heads, FFN 8192, context 1024, global batch 1024 sequences, 100000 optimizer steps,
# AdamW 3e-4 (0.9, 0.95), weight decay 0.1 (not on norms), clip 1.0, cosine to 0 after 1000 warm-up steps, bf16.
# The global batch is reached through gradient accumulation over all GPUs (a multiple of their number; a
# --batch_size flag keeps the sequences a step). DDP fits 8 x 80 GB (python plan.py, docs/distributed.md):
#     torchrun --standalone --nproc_per_node=8 train.py config/paper_1b.py [--loss=ce|focal|mile]
# The paper trained on the Pile with the LLaMA tokenizer (vocab 32000); here the corpus is FineWeb-Edu (or the Pile,
# or local files) with GPT-2's BPE (vocab 50257), prepared first with data/fineweb/prepare.py (see its docstring).
out_dir = "out-paper-1b"
dataset = "fineweb"
arch = "llama"
n_layer = 16
n_head = 8
n_embd = 2048
n_ffn = 8192
block_size = 1024
dropout = 0.0
batch_size = 8  # sequences per micro-batch per GPU
gradient_accumulation_steps = 1024 // batch_size  # 1024 sequences per optimizer step
learning_rate = 3e-4
min_lr = 0.0
beta1 = 0.9
beta2 = 0.95
weight_decay = 0.1
grad_clip = 1.0
warmup_iters = 1000
max_iters = 100000
lr_decay_iters = 100000
eval_interval = 1000
# a checkpoint every 500 steps: a hard kill costs at most ~28 min of 8 H100s at 30% MFU, ~17 at 50%
# [est: 7.8e15 FLOP a step, docs/distributed.md]
checkpoint_interval = 500
eval_iters = 50
log_interval = 10
compile = True
# the loss path: the (B, T, V) logits whole and compiled with the model when they fit, else chunks
# (mile.choose_loss_path, docs/chunked.md); --loss_path=chunked forces the memory-lean chunks
loss_path = "auto"
