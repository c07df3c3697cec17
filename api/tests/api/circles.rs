// Tests of circles — being written.
