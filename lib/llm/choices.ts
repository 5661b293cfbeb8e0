/**
 * Constrained decoding to a fixed set of answers (vLLM's guided choice): the generation spells
 * one of the choices, token by token, as the tokenizer writes each choice. Where one choice is
 * a beginning of another ("yes", "yes, but"), the model may also end there with a stop token.
 */
interface Node {
  next: Map<number, Node>;
  /** A choice ends here. */
  end: boolean;
}

/** A constraint for ModelReplica requests: the ids the next token may be, or null once a choice is spelled. */
export function choiceConstraint(choices: ReadonlyArray<readonly number[]>, stopTokens: readonly number[]): (generated: readonly number[]) => readonly number[] | null {
  const root: Node = { next: new Map(), end: false };
  for (const choice of choices) {
    let node = root;
    for (const token of choice) {
      let child = node.next.get(token);
      if (!child) node.next.set(token, (child = { next: new Map(), end: false }));
      node = child;
    }
    node.end = true;
  }
  const stops = new Set(stopTokens);
  return (generated) => {
    let node = root;
    for (const token of generated) {
      const child = node.next.get(token);
      // Off the choices only by a stop token where a choice ended: done.
      if (!child) return null;
      node = child;
    }
    if (node.next.size === 0) return null;
    const allowed = [...node.next.keys()];
    if (node.end) for (const token of stops) if (!node.next.has(token)) allowed.push(token);
    return allowed;
  };
}
