"""LoRA as PEFT lays it out (``peft/tuners/lora``), one concept per file:

    config.py          LoraConfig, PEFT's name matching, the r/init_lora_weights rules, adapter_config.json
    layer.py           AdapterTables (the per-adapter tables every LoRA layer keeps) and LoraLinear
    embedding.py       LoraEmbedding (PEFT's lora_embedding_A/B)
    dora.py            DoraLinear (DoRA: LoRA with each output unit's magnitude trained apart)
    qlora.py           QLoRA over a 4-bit NF4 base: quantize_model, merge_nf4, output_error
    mixed.py           mixed-adapter batches: one adapter per sequence, through every layer
    modules_to_save.py ModulesToSave (PEFT's ModulesToSaveWrapper: layers trained in full, one copy per adapter)
    model.py           LoraModel and get_lora_model: injection, adapter management, forward, generate
    save_and_load.py   the LoRA half of PEFT's adapter files: save_pretrained, load_adapter, from_pretrained
    loraplus.py        LoRA+'s optimizer param groups (create_loraplus_optimizer)
"""
