// Tests of authorization — being written.
