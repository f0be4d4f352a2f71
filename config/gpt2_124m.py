# GPT-2 small (124M): 12 layers, 12 heads, width 768, context 1024, tied embeddings, ~0.5M tokens per
# step (480 sequences) through gradient accumulation over all GPUs, as nanoGPT's train_gpt2 config.
#     torchrun --standalone --nproc_per_node=8 train.py config/gpt2_124m.py [--loss=ce|focal|mile]
# On FineWeb-Edu with GPT-2's BPE, prepared first: python data/fineweb/prepare.py
out_dir = "out-gpt2-124m"
dataset = "fineweb"
arch = "gpt2"
n_layer = 12
n_head = 12
n_embd = 768
block_size = 1024
bias = True
dropout = 0.0
batch_size = 12
gradient_accumulation_steps = 40  # 480 sequences per optimizer step over all GPUs
learning_rate = 6e-4
min_lr = 6e-5
beta1 = 0.9
beta2 = 0.95
weight_decay = 0.1
grad_clip = 1.0
warmup_iters = 2000
max_iters = 600000
lr_decay_iters = 600000
eval_interval = 1000
eval_iters = 50
log_interval = 10
compile = True
# the loss path: the (B, T, V) logits whole and compiled with the model when they fit, else chunks
# (mile.choose_loss_path, docs/chunked.md); --loss_path=chunked forces the memory-lean chunks
loss_path = "auto"
