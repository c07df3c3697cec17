// Tests of errors — being written.
