"""The models read from the files users keep: a single file, a diffusers folder, checked before loading."""
