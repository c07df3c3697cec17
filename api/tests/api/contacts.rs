// Tests of contacts — being written.
