/** Deployments and actors for the serve suite (registered at module top level). */
import { remote, serve, type HttpRequest } from '../lib/index.js';

/** Answers every request with a small JSON body, and every call with a number. */
export class Hello {
  count = 0;
  fetch(_request: HttpRequest): unknown {
    return { hello: 'world', count: ++this.count };
  }

  ping(): number {
    return ++this.count;
  }
}
export const HelloActor = remote(import.meta, Hello);

/** How long loading one of the zoo's models takes: a stand-in for reading its weights. */
export const MODEL_LOAD_MS = 20;

/** Many models over a few replicas, each keeping two (model multiplexing). */
export class Zoo {
  loads = 0;
  readonly #model = serve.multiplexed(async (id: string) => {
    this.loads++;
    await new Promise((resolve) => setTimeout(resolve, MODEL_LOAD_MS));
    return { id };
  }, { maxModelsPerReplica: 2 });

  /** Answers with the model (the request's, or `modelId`), and how many loads this replica has done. */
  async predict(x: number, modelId?: string): Promise<{ pid: number; loads: number; value: number }> {
    const model = await this.#model(modelId);
    return { pid: process.pid, loads: this.loads, value: model.id.length + x };
  }
}
export const ZooActor = remote(import.meta, Zoo);
