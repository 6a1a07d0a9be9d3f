"""The request core: an Exchange per request, the contracts stages plug into, validation, the Pipeline."""
