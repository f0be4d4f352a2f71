# A small GPT on Shakespeare with GPT-2's BPE (1.4M training tokens, vocabulary 50257): about
# 30M parameters with the embeddings; meant for one GPU.
#     python data/shakespeare/prepare.py   (train.py also runs it when the data is missing)
#     python train.py config/train_shakespeare.py [--loss=ce|focal|mile]
out_dir = "out-shakespeare"
eval_interval = 250
eval_iters = 100
log_interval = 10
dataset = "shakespeare"
batch_size = 32
block_size = 256
n_layer = 6
n_head = 6
n_embd = 384
dropout = 0.2
learning_rate = 6e-4
max_iters = 3000
lr_decay_iters = 3000
min_lr = 6e-5
beta2 = 0.99
warmup_iters = 100
compile = True  # a GPU config: compile the model, and with it the loss (docs/chunked.md)
