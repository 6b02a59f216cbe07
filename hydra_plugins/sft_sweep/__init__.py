"""sft-sweep\x27s Hydra Sweeper plugin (discovered by Hydra\x27s hydra_plugins namespace scan)."""
