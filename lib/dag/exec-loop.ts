/**
 * The actor side of compiled graphs: one exec loop per graph, running the actor's operations in
 * the static schedule, execution after execution, until its channels close. Reads and writes
 * spin briefly, then wait off the JS thread, so the actor keeps answering ordinary calls and other
 * graphs' loops in between. An exception in a method flows downstream as an error value.
 */
import { registerSystemMethod } from '../core/system-methods.js';
import { unpack } from '../core/serialization.js';
import { getCommunicator } from '../gpu/collective.js';
import { Tensor } from '../gpu/tensor.js';
import type { DeviceMemory } from '../gpu/cuda-types.js';
import { cuda } from '../gpu/cuda.js';
import { hostIdentity } from '../core/host.js';
import { ChannelReader, ChannelWriter, encodeIpcMessage, encodeMessage, eventLoopTurn, isChannelClosed, starving, type Message } from './channel.js';
import { IpcImporter, IpcLender, cudaTensorsOf, exportTensors, type IpcPayload } from './ipc.js';
import type { ActorPlan, ArgSpec, Operation } from './plan.js';

interface Loop {
  plan: ActorPlan;
  readers: Map<string, ChannelReader>;
  writers: Map<string, ChannelWriter>;
  /** CUDA IPC: per channel written, the tensors lent and the count of messages written. */
  lenders: Map<string, { lender: IpcLender; sent: number }>;
  /** CUDA IPC: per channel read, the count of executions done with its messages. */
  finished: Map<string, number>;
  importer: IpcImporter | undefined;
  /** Views of other processes' memory that this execution's reads mapped. */
  views: DeviceMemory[];
  stopped: boolean;
  done: Promise<void>;
}

const loops = new Map<string, Loop>();

function errorInfo(error: unknown, label: string) {
  const err = error instanceof Error ? error : new Error(String(error));
  return { name: err.name, message: `${label}: ${err.message}`, code: (err as { code?: string }).code, stack: err.stack };
}

function tensorOf(message: Message | undefined, what: string): Tensor {
  if (!message?.ok || !(message.value instanceof Tensor)) throw new TypeError(`${what} needs a Tensor`);
  return message.value;
}

/**
 * Runs one operation: synchronously when it can (a read whose message is there or comes within the
 * hot wait, a method that returns a plain value, a write with room), else a promise of its end.
 * Most executions of a small graph thus run without a single promise.
 */
function runOperation(loop: Loop, actor: any, operation: Operation, values: Map<number, Message>, prefetched: Map<string, Promise<Message> | Message>): Promise<void> | undefined {
  switch (operation.op) {
    case 'read': {
      const pending = prefetched.get(operation.channel);
      if (pending !== undefined) prefetched.delete(operation.channel);
      const read = pending ?? loop.readers.get(operation.channel)!.read();
      if (read instanceof Promise) return read.then((message) => void values.set(operation.node, received(loop, message)));
      values.set(operation.node, received(loop, read));
      return undefined;
    }
    case 'attr': {
      const input = values.get(operation.input)!;
      if (!input.ok) return void values.set(operation.node, input);
      const args = input.value as unknown[];
      const value = operation.index !== undefined ? args[operation.index] : (args[0] as Record<string, unknown> | undefined)?.[operation.key!];
      values.set(operation.node, { ok: true, value });
      return undefined;
    }
    case 'compute': {
      const args: unknown[] = [];
      for (const spec of operation.args as ArgSpec[]) {
        if ('constant' in spec) args.push(unpack(spec.constant));
        else if ('input' in spec) {
          const input = values.get(loop.plan.inputNode);
          if (!input?.ok) return void values.set(operation.node, input ?? { ok: false, error: errorInfo('no input', operation.label) });
          args.push((input.value as unknown[])[0]);
        } else {
          const message = values.get(spec.node);
          if (!message) return void values.set(operation.node, { ok: false, error: errorInfo(`missing input #${spec.node}`, operation.label) });
          // An upstream failure flows on in place of this node's result.
          if (!message.ok) return void values.set(operation.node, message);
          args.push(message.value);
        }
      }
      let result: unknown;
      try {
        const method = actor?.[operation.method];
        if (typeof method !== 'function') throw new TypeError(`the actor has no method '${operation.method}'`);
        result = method.apply(actor, args);
      } catch (error) {
        return void values.set(operation.node, { ok: false, error: errorInfo(error, operation.label) });
      }
      if (result !== null && typeof result === 'object' && typeof (result as PromiseLike<unknown>).then === 'function') {
        return Promise.resolve(result).then(
          (value) => void values.set(operation.node, { ok: true, value }),
          (error) => void values.set(operation.node, { ok: false, error: errorInfo(error, operation.label) }),
        );
      }
      values.set(operation.node, { ok: true, value: result });
      return undefined;
    }
    case 'write': {
      const writer = loop.writers.get(operation.channel)!;
      const message = values.get(operation.node)!;
      let bytes: Uint8Array;
      try {
        bytes = operation.ipc ? encodeForIpc(loop, writer, message) : encodeMessage(message);
      } catch (error) {
        // A result that cannot be sent fails its execution, not the graph.
        bytes = encodeMessage({ ok: false, error: errorInfo(error, `the result of node #${operation.node}`) });
      }
      return writer.writeBytes(bytes, loop.plan.writeTimeout);
    }
    default:
      return runCommunication(operation, values);
  }
}

/** A message as read: CUDA IPC handles mapped to tensors (views of the writer's memory). */
function received(loop: Loop, message: Message): Message {
  if (!message.ok || !message.ipc) return message;
  try {
    loop.importer ??= new IpcImporter();
    return { ok: true, value: loop.importer.open(message.value as IpcPayload, loop.views) };
  } catch (error) {
    return { ok: false, error: errorInfo(error, 'mapping a CUDA tensor by IPC') };
  }
}

/**
 * A message for a CUDA IPC channel: CUDA tensors as handles (held until every reader is done with
 * this message), anything else as usual.
 */
function encodeForIpc(loop: Loop, writer: ChannelWriter, message: Message): Uint8Array {
  let entry = loop.lenders.get(writer.name);
  if (!entry) loop.lenders.set(writer.name, (entry = { lender: new IpcLender(), sent: 0 }));
  entry.lender.settle(writer.finished);
  const sequence = entry.sent++;
  const found = message.ok ? cudaTensorsOf(message.value) : undefined;
  if (!found) return encodeMessage(message);
  const { payload, held } = exportTensors(found);
  entry.lender.lend(sequence, held);
  return encodeIpcMessage(payload);
}

/** An execution ended: free the views it mapped, and tell IPC writers it is done with their messages. */
function endExecution(loop: Loop): void {
  for (const view of loop.views.splice(0)) view.free();
  for (const [channel, count] of loop.finished) {
    loop.finished.set(channel, count + 1);
    loop.readers.get(channel)!.finish(count + 1);
  }
}

async function runCommunication(operation: Operation, values: Map<number, Message>): Promise<void> {
  switch (operation.op) {
    case 'collective': {
      const source = values.get(operation.source);
      if (!source?.ok) return void values.set(operation.node, source!);
      try {
        const communicator = getCommunicator(operation.group);
        const tensor = tensorOf(source, operation.kind);
        // Outputs live where the input does: host memory for the CPU communicator, the GPU for NCCL.
        const options = { dtype: tensor.dtype, device: tensor.device };
        if (operation.kind === 'allreduce') {
          // Reduced in a copy: other readers of the input must still see it as it was.
          const output = Tensor.empty(tensor.shape, options);
          if (tensor.isCuda) output.memory.copyFromDevice(tensor.memory, tensor.byteLength);
          else output.bytes().set(tensor.bytes());
          await communicator.allreduce(output, operation.reduce);
          values.set(operation.node, { ok: true, value: output });
        } else if (operation.kind === 'allgather') {
          const output = Tensor.empty([communicator.size * tensor.numel], options);
          await communicator.allgather(tensor, output);
          values.set(operation.node, { ok: true, value: output });
        } else {
          const output = Tensor.empty([tensor.numel / communicator.size], options);
          await communicator.reducescatter(tensor, output, operation.reduce);
          values.set(operation.node, { ok: true, value: output });
        }
      } catch (error) {
        values.set(operation.node, { ok: false, error: errorInfo(error, operation.kind) });
      }
      return;
    }
    case 'exchange': {
      // Headers first (dtype and shape, so receivers can allocate), then the tensors, each phase
      // issued as one group so that sends and receives of the same step meet.
      const communicator = getCommunicator(operation.group);
      // Headers and received tensors live where the communicator moves them (NCCL: the rank's GPU).
      const device = communicator.tensorDevice;
      const headerBytes = 256;
      const sendHeaders = operation.sends.map((send) => {
        const message = values.get(send.node);
        const tensor = message?.ok && message.value instanceof Tensor ? message.value : undefined;
        const header = new TextEncoder().encode(JSON.stringify(tensor ? [tensor.dtype, tensor.shape] : ['error', message && !message.ok ? message.error.message : 'not a tensor']));
        const padded = new Uint8Array(headerBytes);
        padded.set(header.subarray(0, headerBytes));
        return { send, tensor, header: Tensor.wrap(padded, 'u8').to(device) };
      });
      const recvHeaders = operation.recvs.map((recv) => ({ recv, header: Tensor.empty([headerBytes], { dtype: 'u8', device }) }));
      communicator.groupStart();
      for (const { send, header } of sendHeaders) void communicator.send(header, send.peer);
      for (const { recv, header } of recvHeaders) void communicator.recv(header, recv.peer);
      await communicator.groupEnd();
      const incoming = recvHeaders.map(({ recv, header }) => {
        const text = new TextDecoder().decode(header.cpu().data as Uint8Array).replace(/\0+$/, '');
        const [dtype, shape] = JSON.parse(text) as [string, number[] | string];
        return { recv, dtype, shape, tensor: dtype === 'error' ? undefined : Tensor.empty(shape as number[], { dtype: dtype as never, device }) };
      });
      communicator.groupStart();
      for (const { send, tensor } of sendHeaders) if (tensor) void communicator.send(tensor.to(device), send.peer);
      for (const { tensor, recv } of incoming) if (tensor) void communicator.recv(tensor, recv.peer);
      await communicator.groupEnd();
      for (const { recv, tensor, shape } of incoming) {
        values.set(recv.node, tensor ? { ok: true, value: tensor } : { ok: false, error: { name: 'Error', message: `upstream node failed: ${shape}` } });
      }
      return;
    }
  }
}

async function run(loop: Loop, actor: unknown): Promise<void> {
  const prefetched = new Map<string, Promise<Message> | Message>();
  const operations = loop.plan.operations;
  const reads = operations.filter((op): op is Extract<Operation, { op: 'read' }> => op.op === 'read');
  const lastRead = operations.lastIndexOf(reads[reads.length - 1]);
  const values = new Map<number, Message>();
  try {
    while (!loop.stopped) {
      values.clear();
      for (let index = 0; index < operations.length; index++) {
        const pending = runOperation(loop, actor, operations[index], values, prefetched);
        if (pending) await pending;
        // Overlap: once this execution's inputs are in, start receiving the next one's.
        if (loop.plan.overlap && index === lastRead) {
          for (const read of reads) {
            // Not blocking: this thread has the current execution to compute meanwhile.
            const next = loop.readers.get(read.channel)!.read(Infinity, false);
            if (next instanceof Promise) next.catch(() => {});
            prefetched.set(read.channel, next);
          }
        }
      }
      if (loop.finished.size > 0 || loop.views.length > 0) endExecution(loop);
      // Executions that find their inputs at once never leave the microtask queue: let the
      // actor's socket (ordinary calls, the stop of this loop) have a turn now and then.
      if (starving()) await eventLoopTurn();
    }
  } catch (error) {
    // Another actor's stop may abort a shared communicator before this actor's own stop arrives.
    const tornDown = (error as { code?: string }).code === 'ERR_COMMUNICATOR_ABORTED' && String((error as Error).message).includes(`compiled graph ${loop.plan.graphId} was torn down`);
    if (!isChannelClosed(error) && !loop.stopped && !tornDown) {
      // Something beyond a method failed: close the graph's channels this actor writes, so the
      // driver and the other actors see it instead of waiting.
      for (const writer of loop.writers.values()) writer.close();
      console.error(`trellis: exec loop of ${loop.plan.graphId} failed:`, error);
    }
  } finally {
    for (const view of loop.views.splice(0)) view.free();
    loop.importer?.close();
    for (const { lender } of loop.lenders.values()) lender.clear();
    for (const reader of loop.readers.values()) reader.release();
    for (const writer of loop.writers.values()) writer.release();
    loops.delete(loop.plan.graphId);
  }
}

registerSystemMethod('__trellis_dag_start', function (this: unknown, plan: ActorPlan) {
  const readers = new Map<string, ChannelReader>();
  const writers = new Map<string, ChannelWriter>();
  for (const operation of plan.operations) {
    if (operation.op === 'read' && !readers.has(operation.channel)) readers.set(operation.channel, new ChannelReader(operation.channel, operation.reader));
    if (operation.op === 'write' && !writers.has(operation.channel)) writers.set(operation.channel, new ChannelWriter(operation.channel));
  }
  const finished = new Map<string, number>();
  for (const operation of plan.operations) if (operation.op === 'read' && operation.ipc) finished.set(operation.channel, 0);
  const loop: Loop = { plan, readers, writers, lenders: new Map(), finished, importer: undefined, views: [], stopped: false, done: Promise.resolve() };
  loops.set(plan.graphId, loop);
  loop.done = run(loop, this);
  return true;
});

/** What compile needs: whether this actor can use CUDA (IPC edges), and on which host it runs. */
registerSystemMethod('__trellis_dag_probe', () => ({ cuda: cuda.available, host: hostIdentity() }));

registerSystemMethod('__trellis_dag_stop', async (graphId: string) => {
  const loop = loops.get(graphId);
  if (!loop) return;
  loop.stopped = true;
  for (const reader of loop.readers.values()) reader.close();
  // A loop blocked in a collective or an exchange waits on its peers, not on a channel: abort the
  // graph's communicators so that it fails at once (this call holds the actor's queue meanwhile).
  for (const operation of loop.plan.operations) {
    if (operation.op === 'collective' || operation.op === 'exchange') {
      try {
        getCommunicator(operation.group).abort(`compiled graph ${graphId} was torn down`);
      } catch {
        // The group is already gone.
      }
    }
  }
  await loop.done;
});
