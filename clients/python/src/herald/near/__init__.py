"""The near cache: an in-process cache kept coherent by cache-api's Watch stream."""
