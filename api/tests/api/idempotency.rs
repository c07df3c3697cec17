// Tests of idempotency — being written.
