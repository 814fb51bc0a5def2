"""Ways into the engine from Hugging Face training code: `ZeroTrainer` and `ZeroAccelerator`."""
