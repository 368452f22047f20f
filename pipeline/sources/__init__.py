"""Source readers: each turns one collection or table into a stream of Arrow record batches."""
