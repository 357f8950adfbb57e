"""Task recipes (pretrain, finetune): short modules wiring model, objective, data and the Trainer."""
