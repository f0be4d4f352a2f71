# A baby GPT on Shakespeare-char, the size of nanoGPT's shakespeare_char config: about 10.7M
# parameters; a few minutes on one GPU (far too slow for a laptop CPU: the defaults are for that).
#     python train.py config/train_shakespeare_char.py [--loss=ce|focal|mile]
out_dir = "out-shakespeare-char"
eval_interval = 250
eval_iters = 200
log_interval = 10
dataset = "shakespeare_char"
batch_size = 64
block_size = 256
n_layer = 6
n_head = 6
n_embd = 384
dropout = 0.2
learning_rate = 1e-3
max_iters = 5000
lr_decay_iters = 5000
min_lr = 1e-4
beta2 = 0.99
warmup_iters = 100
compile = True  # a GPU config: compile the model, and with it the loss (docs/chunked.md)
