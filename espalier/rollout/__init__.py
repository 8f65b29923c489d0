"""Running the program, scoring runs and building GRPO groups (no model code here)."""
