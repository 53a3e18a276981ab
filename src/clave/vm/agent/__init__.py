"""The guest agent: runs inside the VM as the child of its init and serves ``clave.agent.v1.AgentService``
(protos/clave/agent.proto, modelled on Kata's AgentService) and ``Health`` over Clave's ttrpc on a virtio-serial
port (``/dev/vport*p1``: no vsock here). Containers run with Clave's own engine and native handler, so
namespaces, cgroups, seccomp and capabilities are applied by the guest kernel.

Stdio as byte streams. Kata's agent polls (ReadStdout/ReadStderr long-poll RPCs), and output still buffered
when the exit is reported is lost. Here each process has one bidirectional ttrpc stream, ``AttachIO``, on the
same connection as every other call:

- the first client message names the process; later client messages are stdin bytes, written in order; the
  client closing its side (ttrpc's remote-closed flag) is stdin's end of file: the agent closes the pipe;
- the agent reads stdout and stderr pipes (or the pty master) and sends ``IOChunk{fd, data, offset}``
  messages; ``offset`` counts the bytes already sent on that fd, so a gap is visible to the host;
- the stream finishes only after both pipes reached end of file (every writer, including the process's
  children, closed them), and ``WaitProcess`` answers only after the process exited *and* its stream sent
  its last chunk. One connection is one ordered byte stream, so the host has every output byte before it
  sees the exit status.

A host must attach before it starts the process (as containerd opens the fifos before Start); output waits in
the pipe until then. A second virtio-serial port per stream was the alternative; it needs a device per
process at boot, which cannot be hot-added on microvm, and would need its own framing anyway.
"""
