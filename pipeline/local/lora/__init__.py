"""LoRAs on the loaded pipeline: where a file comes from, PEFT adapters, fused for a compiled pipeline."""
