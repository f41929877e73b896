"""QeRL mode: LoRA adapters on a frozen (bf16 or NVFP4) base.

* :mod:`~qrl_megatron.lora.adapter` -- the adapter as HF/PEFT sees it: names, shapes, bytes, ``adapter_config.json``
  (pure; shared by the learner, the bridge, the engine and the export).
* :mod:`~qrl_megatron.lora.layers` -- LoRA on Megatron's column/row-parallel linears, and the frozen base they wrap.
* :mod:`~qrl_megatron.lora.export` -- the PEFT adapter folder and the merged HF model.
"""
