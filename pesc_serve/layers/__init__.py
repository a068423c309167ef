"""Building blocks of the decoder: norms, RoPE, attention, the PESC MLP, quantized linears, sampling."""
