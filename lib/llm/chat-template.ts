/**
 * Chat templates: the Jinja program an instruction-tuned checkpoint ships to turn a conversation
 * into the exact text it was trained on (its role markers, its special tokens, where the
 * assistant's answer begins). Read from the checkpoint's chat_template.jinja, or the
 * `chat_template` of its tokenizer_config.json (a string, or named templates), with the special
 * tokens that config names (bos_token, eos_token, ...), as Hugging Face's apply_chat_template does.
 * Rendering runs on @huggingface/jinja, the Jinja subset written for these templates.
 */
import { existsSync, readFileSync, statSync } from 'node:fs';
import { basename, dirname, join } from 'node:path';
import { Template } from '@huggingface/jinja';
import { InvalidArgumentError, ModelLoadError } from '../errors.js';

/** One turn of a conversation. `content` is text, or parts ({ type: 'text', text }) for templates that take them. */
export interface ChatMessage {
  role: string;
  content?: string | Array<Record<string, unknown>> | null;
  /** Other fields (name, tool_calls, ...) reach the template as they are. */
  [field: string]: unknown;
}

export interface ChatTemplateRenderOptions {
  /** End with the opening of the assistant's turn, so generation answers (default true). */
  addGenerationPrompt?: boolean;
  /** More variables for the template: tools, documents, or a template's own switches. */
  variables?: Record<string, unknown>;
}

export interface ChatTemplateLoadOptions {
  /** Which of a tokenizer_config.json's named templates (default 'default', or the only one). */
  name?: string;
  /** A template's Jinja source to use instead of the checkpoint's, with the checkpoint's special tokens. */
  source?: string;
}

/** Where the template came from, for errors that name it. */
interface TemplateSource {
  file?: string;
}

const TEMPLATE_FILE = 'chat_template.jinja';
const CONFIG_FILE = 'tokenizer_config.json';

/** A tokenizer_config.json's token entry: a string, or an AddedToken object with its content. */
function tokenText(value: unknown): string | undefined {
  if (typeof value === 'string') return value;
  if (typeof value === 'object' && value !== null && typeof (value as { content?: unknown }).content === 'string') return (value as { content: string }).content;
  return undefined;
}

function describe(value: unknown): string {
  if (value === null) return 'null';
  if (Array.isArray(value)) return 'an array';
  return typeof value === 'object' ? 'an object' : `${typeof value === 'undefined' ? 'nothing' : `a ${typeof value}`}`;
}

/**
 * Rows of a dataset may hold Arrow's struct and list views rather than plain objects: the
 * template sees plain values, read through their toJSON.
 */
function plain(value: unknown): unknown {
  if (Array.isArray(value)) return value.map(plain);
  if (typeof value === 'object' && value !== null) {
    const json = (value as { toJSON?: () => unknown }).toJSON;
    if (typeof json === 'function' && !(value instanceof Date)) return plain(json.call(value));
    return Object.fromEntries(Object.entries(value).map(([key, field]) => [key, plain(field)]));
  }
  return value;
}

export class ChatTemplate {
  /** The template's Jinja source. */
  readonly source: string;
  /** Special tokens the template may name (bos_token, eos_token, ...), by their config names. */
  readonly specialTokens: Readonly<Record<string, string>>;
  readonly #template: Template;
  readonly #file: string | undefined;

  /**
   * A template from its source; special tokens by their tokenizer_config.json names
   * ({ bos_token: '<s>', eos_token: '</s>' }). A template Jinja cannot parse is a ModelLoadError
   * 'ERR_CHAT_TEMPLATE' with the parser's reason.
   */
  constructor(source: string, specialTokens: Record<string, string> = {}, from: TemplateSource = {}) {
    if (typeof source !== 'string' || source.length === 0) throw new InvalidArgumentError(`a chat template must be a non-empty string, got ${describe(source)}`, 'ERR_CHAT_TEMPLATE');
    this.source = source;
    this.specialTokens = { ...specialTokens };
    this.#file = from.file;
    try {
      this.#template = new Template(source);
    } catch (error) {
      const where = from.file ? ` in ${from.file}` : '';
      throw new ModelLoadError('ERR_CHAT_TEMPLATE', `the chat template${where} does not parse: ${(error as Error).message}`, from.file ? { file: from.file } : {});
    }
  }

  /**
   * The chat template of a checkpoint directory (or of a tokenizer_config.json or .jinja file
   * named directly): chat_template.jinja when the directory has one, else tokenizer_config.json's
   * `chat_template`. Special tokens come from tokenizer_config.json either way. A checkpoint
   * without a template is a ModelLoadError 'ERR_CHAT_TEMPLATE' (base models have none).
   */
  static load(path: string, options: ChatTemplateLoadOptions = {}): ChatTemplate {
    if (typeof path !== 'string') throw new InvalidArgumentError(`ChatTemplate.load() needs a path, got ${describe(path)}`);
    if (!existsSync(path)) throw new ModelLoadError('ERR_CHAT_TEMPLATE', `no such file or directory: ${path}`, { file: path });
    const directory = statSync(path).isDirectory() ? path : dirname(path);
    const configPath = statSync(path).isDirectory() || basename(path) !== CONFIG_FILE ? join(directory, CONFIG_FILE) : path;
    let config: Record<string, unknown> = {};
    if (existsSync(configPath)) {
      try {
        config = JSON.parse(readFileSync(configPath, 'utf8')) as Record<string, unknown>;
      } catch (error) {
        throw new ModelLoadError('ERR_CHAT_TEMPLATE', `${configPath} is not valid JSON: ${(error as Error).message}`, { file: configPath });
      }
      if (typeof config !== 'object' || config === null || Array.isArray(config)) throw new ModelLoadError('ERR_CHAT_TEMPLATE', `${configPath} must hold a JSON object`, { file: configPath });
    }
    const specialTokens: Record<string, string> = {};
    for (const [key, value] of Object.entries(config)) {
      const text = key.endsWith('_token') ? tokenText(value) : undefined;
      if (text !== undefined) specialTokens[key] = text;
    }
    if (options.source !== undefined) return new ChatTemplate(options.source, specialTokens);
    const fromFile = (file: string) => new ChatTemplate(readFileSync(file, 'utf8'), specialTokens, { file });
    if (statSync(path).isFile() && path.endsWith('.jinja')) return fromFile(path);
    const { name } = options;
    if (name !== undefined && (typeof name !== 'string' || !/^[\w.-]+$/.test(name))) throw new InvalidArgumentError(`a chat template's name is a word like 'tool_use', got ${JSON.stringify(name)}`);
    // Newer checkpoints keep the default template in its own file and the others in a folder.
    const file = name === undefined || name === 'default' ? join(directory, TEMPLATE_FILE) : join(directory, 'additional_chat_templates', `${name}.jinja`);
    if (existsSync(file)) return fromFile(file);
    return new ChatTemplate(ChatTemplate.#fromConfig(config.chat_template, configPath, name), specialTokens, { file: configPath });
  }

  static #fromConfig(value: unknown, file: string, name: string | undefined): string {
    if (value === undefined || value === null) {
      throw new ModelLoadError('ERR_CHAT_TEMPLATE', `no chat template: neither ${TEMPLATE_FILE} nor a chat_template in ${file} (a base model has none; pass one)`, { file });
    }
    if (typeof value === 'string') {
      if (name !== undefined && name !== 'default') throw new ModelLoadError('ERR_CHAT_TEMPLATE', `${file} has one chat template, not one named '${name}'`, { file });
      return value;
    }
    // Several templates, each { name, template } (e.g. 'default' and 'tool_use').
    if (Array.isArray(value)) {
      const named = new Map<string, string>();
      for (const entry of value) {
        const { name: entryName, template } = (entry ?? {}) as { name?: unknown; template?: unknown };
        if (typeof entryName !== 'string' || typeof template !== 'string') throw new ModelLoadError('ERR_CHAT_TEMPLATE', `${file}: each of chat_template's entries needs a string name and template`, { file });
        named.set(entryName, template);
      }
      const wanted = name ?? (named.size === 1 ? [...named.keys()][0] : 'default');
      const template = named.get(wanted);
      if (template === undefined) throw new ModelLoadError('ERR_CHAT_TEMPLATE', `${file} has no chat template named '${wanted}' (it has ${[...named.keys()].map((key) => `'${key}'`).join(', ')})`, { file });
      return template;
    }
    throw new ModelLoadError('ERR_CHAT_TEMPLATE', `${file}: chat_template must be a string or a list of named templates, got ${describe(value)}`, { file });
  }

  /**
   * The conversation as the model's prompt text. Tokenize it without adding special tokens again
   * (the template writes them). Messages that are not a list of { role, content } turns are an
   * InvalidArgumentError 'ERR_CHAT_MESSAGES' naming the turn; a template that refuses them
   * (raise_exception, e.g. roles that do not alternate) or fails on them is an
   * InvalidArgumentError 'ERR_CHAT_TEMPLATE' with its message.
   */
  render(messages: readonly ChatMessage[], options: ChatTemplateRenderOptions = {}): string {
    const turns = ChatTemplate.checkMessages(messages);
    const variables = options.variables ?? {};
    if (typeof variables !== 'object' || variables === null || Array.isArray(variables)) throw new InvalidArgumentError(`variables must be an object, got ${describe(variables)}`);
    try {
      return this.#template.render({
        ...this.specialTokens,
        ...(plain(variables) as Record<string, unknown>),
        messages: turns,
        add_generation_prompt: options.addGenerationPrompt ?? true,
      });
    } catch (error) {
      const where = this.#file ? ` (${this.#file})` : '';
      throw new InvalidArgumentError(`the chat template${where} refused the messages: ${(error as Error).message}`, 'ERR_CHAT_TEMPLATE');
    }
  }

  /** Plain copies of the turns, or an error naming the first one that is not a turn. */
  static checkMessages(messages: unknown): ChatMessage[] {
    const turns = plain(messages);
    if (!Array.isArray(turns)) throw new InvalidArgumentError(`messages must be an array of { role, content } turns, got ${describe(messages)}`, 'ERR_CHAT_MESSAGES');
    turns.forEach((turn: unknown, index) => {
      if (typeof turn !== 'object' || turn === null || Array.isArray(turn)) throw new InvalidArgumentError(`message ${index} must be an object with a role and content, got ${describe(turn)}`, 'ERR_CHAT_MESSAGES');
      const { role, content } = turn as ChatMessage;
      if (typeof role !== 'string' || role.length === 0) throw new InvalidArgumentError(`message ${index} needs a role (a non-empty string), got ${describe(role)}`, 'ERR_CHAT_MESSAGES');
      if (!(content === undefined || content === null || typeof content === 'string' || (Array.isArray(content) && content.every((part) => typeof part === 'object' && part !== null && !Array.isArray(part))))) {
        throw new InvalidArgumentError(`message ${index} (${role}): content must be a string or a list of parts, got ${describe(content)}`, 'ERR_CHAT_MESSAGES');
      }
    });
    return turns as ChatMessage[];
  }
}
