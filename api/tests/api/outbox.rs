// Tests of outbox — being written.
