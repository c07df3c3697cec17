// Tests of disputes — being written.
