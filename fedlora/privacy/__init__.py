"""Differential privacy in fedlora: accounted, never assumed.

* :mod:`fedlora.privacy.client_level`: DP-FedAvg on the server (clip every accepted update, average
  over the sampled clients, add Gaussian noise; fixed or adaptive clipping), for every strategy
  whose release is a sum (FedIT, FFA-LoRA, FedSA-LoRA, HetLoRA), with or without DyLoRA.
* :mod:`fedlora.privacy.example_level`: DP-SGD on each client with Opacus, a hook on the one
  training loop; the client's accountant lives in its client-state store.
* :mod:`fedlora.privacy.accounting`: epsilon from library accountants (Flower's ``RdpAccountant``
  for client level, Opacus' RDP accountant for example level) and noise calibration for a target.
"""
