"""Continual learning on the clients: a task sequence learned by the whole federation.

``tasks`` (the sequence, one label space), ``mixing`` (finished tasks' LoRAs in the forward pass,
AM-LoRA's attention), ``penalties`` (O-LoRA's and AM-LoRA's loss terms as pure functions),
``hooks`` (those terms on the training loop), ``head`` (a frozen head from the label names),
``federation`` (the server's task switch and hand-over of finished tasks), ``client`` (the
client's side), ``metrics`` (accuracy matrix, BWT, forgetting, heat map)."""
