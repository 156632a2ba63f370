"""Upper bounds on what a spec (and so a lock) may ask for, enforced by the schema and named in errors.

Generous on purpose: the largest real systems and models. They exist so that a typo such as
`count: 100000000` or `batch_size: 99999999999999999999` is refused at once instead of searched
for minutes or printed as absurd GiB.
"""

# One node: an NVL72 rack (GB200/GB300 NVL72) is the largest single NVLink domain sold, 72 GPUs.
MAX_GPUS = 72
# Serving engines schedule a few hundred to a couple of thousand sequences per step (vLLM's
# max_num_seqs defaults to 256 or 1024); 4096 leaves room for offline batch jobs.
MAX_BATCH_SIZE = 4096
# The longest context a released model is configured for: Llama 4 Scout's 10M tokens
# (text_config.max_position_embeddings 10485760).
MAX_SEQ_LEN = 10_485_760
