"""The Hugging Face Hub side of lora-forge, through huggingface_hub's own API:

- `download`: a base model's files into results/{model}/base (the fetch_base rule), the
  revision pinned to a commit, every file checked against the hub's listing before the folder
  gets its final name.
- `upload`: GGUFs, the adapter and generated model cards to the hub (the upload_hub rule),
  verified against the hub's LFS sha256, optionally freeing the local GGUFs.
- `settings`: the `hub:` config block per model (repo ids, quants, visibility).
- `errors`: huggingface_hub's exceptions as one line naming the repo (a UserError).

The token is only ever read from HF_TOKEN and passed to huggingface_hub in memory."""
