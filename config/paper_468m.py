# The paper's 468M model and optimizer settings (Su et al. 2024): LLaMA block,
# d_model 1024, 24 layers, 16 heads, FFN 4096, context 1024, global batch 1024 sequences, 100000 optimizer steps,
# AdamW 3e-4 (0.9, 0.95), weight decay 0.1 (not on norms), clip 1.0, cosine to 0 after 1000 warm-up steps, bf16.
# The global batch is reached through gradient accumulation over all GPUs (a multiple of their number; a
# --batch_size flag keeps the sequences a step). DDP fits 8 x 80 GB (python plan.py, docs/distributed.md):
#     torchrun --standalone --nproc_per_node=8 train.py config/paper_468m.py [--loss=ce|focal|mile]
# The paper trained on the Pile with the LLaMA tokenizer (vocab 32000); here the corpus is FineWeb-Edu (or the Pile,
# or local files) with GPT-2's BPE (vocab 50257), prepared first with data/fineweb/prepare.py (see its docstring).
out_dir = "out-paper-468m"
dataset = "fineweb"
arch = "llama"
n_layer = 24
n_head = 16
n_embd = 1024
n_ffn = 4096
block_size = 1024
dropout = 0.0
batch_size = 16  # sequences per micro-batch per GPU
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
# a checkpoint every 1000 steps (at each evaluation): a hard kill costs at most ~22 min of 8 H100s at 30% MFU,
# ~13 at 50% [est: 3.2e15 FLOP a step, docs/distributed.md]
checkpoint_interval = 1000
eval_iters = 50
log_interval = 10
compile = True
# the loss path: the (B, T, V) logits whole and compiled with the model when they fit, else chunks
# (mile.choose_loss_path, docs/chunked.md); --loss_path=chunked forces the memory-lean chunks
loss_path = "auto"
