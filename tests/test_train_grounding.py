"""scripts/train_grounding.py: the training targets are right (they are what the shipped model learned from),
every packed training question (grounding and POPE yes/no) is computed exactly as its single-turn evaluation
prompt, the expression probe's classes are what the expression says, and a run is deterministic."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from lmms_prune.toy.data import Description, generate_scenes, parse_expression
from lmms_prune.toy.grounder import SCENE_KWARGS, grounder_tokenizer, grounding_corpus


@pytest.fixture(scope="module")
def scenes():
    return list(generate_scenes(12, 31, **{**SCENE_KWARGS, "n_objects": (2, 3)}))


def test_edge_cells_hold_the_pixels_the_box_edges_come_from(tg, scenes):
    cell = tg.CELL
    for scene in scenes:
        targets = tg.cell_targets(scene)
        width, height = scene.image.size
        rows, cols = torch.arange(256) // 16, torch.arange(256) % 16
        for k, obj in enumerate(scene.objects):
            x1, y1, x2, y2 = obj.box
            edges = targets.edges[k]
            assert all(bool(edges[part].any()) for part in range(4)), obj
            assert set(cols[edges[0]].tolist()) == {x1 // cell}
            assert set(rows[edges[1]].tolist()) == {y1 // cell}
            assert set(cols[edges[2]].tolist()) == {(x2 - 1) // cell}
            assert set(rows[edges[3]].tolist()) == {(y2 - 1) // cell}
            # edge cells are cells of the object, and the object's cells are exactly those inside its box
            # that hold its pixels (at least its edge rows and columns)
            assert bool((edges <= targets.cells[k]).all())
            inside = ((cols >= x1 // cell) & (cols <= (x2 - 1) // cell) & (rows >= y1 // cell)
                      & (rows <= (y2 - 1) // cell))
            assert bool((targets.cells[k] <= inside).all())
            # where the object is the cell's main content, the in-cell extent lies in the cell and in the box,
            # and on its edge cells it is the box edge itself
            mine = targets.owner == k
            assert bool((targets.color[mine] == 1 + tg.COLORS.index(obj.color)).all())
            assert bool((targets.shape[mine] == 1 + tg.SHAPES.index(obj.shape)).all())
            assert bool((mine <= targets.cells[k]).all())
            ext = targets.extent * torch.tensor([width, height, width, height])
            for i in mine.nonzero()[:, 0].tolist():
                ex1, ey1, ex2, ey2 = ext[i].round().tolist()
                c0, r0 = cols[i].item() * cell, rows[i].item() * cell
                assert c0 <= ex1 < ex2 <= c0 + cell and r0 <= ey1 < ey2 <= r0 + cell
                assert x1 <= ex1 and ex2 <= x2 and y1 <= ey1 and ey2 <= y2
                for part, value in enumerate((x1, y1, x2, y2)):
                    if edges[part, i]:
                        assert (ex1, ey1, ex2, ey2)[part] == value
                assert targets.box[i].tolist() == pytest.approx([x1 / width, y1 / height, x2 / width,
                                                                 y2 / height])
        background = ~targets.cells.any(0)
        assert bool((background == (targets.owner == -1)).all())
        assert bool((targets.color[background] == 0).all()) and bool((targets.shape[background] == 0).all())


def test_training_sequence_is_the_eval_prompt_with_every_answer_supervised(tg, scenes):
    processor = tg.grounder_processor()
    builder = tg.SequenceBuilder(processor, questions_per_object=2)
    for scene in scenes[:4]:  # raises if a question differs from the processor's prompt plus the answer
        tg.check_prompt_tokens(builder, scene)
    batch = builder.batch(scenes[:3], np.random.default_rng(0))
    tokenizer = processor.tokenizer
    for row, scene in enumerate(scenes[:3]):
        labels = batch.labels[row]
        supervised = labels != tg.IGNORE
        assert bool((labels[supervised] == batch.input_ids[row][supervised]).all())
        # split the supervised positions into contiguous answer spans
        spans, current = [], []
        for i, flag in enumerate(supervised.tolist()):
            if flag:
                current.append(i)
            elif current:
                spans.append(current)
                current = []
        answers = [tokenizer.decode(batch.input_ids[row, s]) for s in spans]
        width, height = scene.image.size
        expected = {tg.box_answer(o.box, width, height) + "<|im_end|>" for o in scene.objects}
        assert set(answers) == expected  # every object is asked about
        for answer in answers:
            assert answer.startswith("<box>[[") and answer.endswith("]]</box><|im_end|>")
    # every supervised digit is tagged with its coordinate (0-3), every other answer token with -1
    digit_ids = builder.digit_ids
    targets = batch.input_ids[batch.query_rows, batch.query_positions + 1]
    is_digit = torch.tensor([int(t) in digit_ids for t in targets])
    assert bool(((batch.query_parts >= 0) == is_digit).all())
    assert set(batch.query_parts[is_digit].tolist()) == {0, 1, 2, 3}
    assert int(batch.n_questions) == len(batch.query_rows[targets == builder.box_id])
    # the text-attention target of every query is its own question's expression, and the probe's classes
    # are that expression's
    for q in range(len(batch.query_rows)):
        row, position = int(batch.query_rows[q]), int(batch.query_positions[q])
        start, end = batch.query_text[q].tolist()
        expression = tokenizer.decode(batch.input_ids[row, start:end])
        assert start < end <= position
        assert tokenizer.decode(batch.input_ids[row, start - 1]) == "<ref>"
        assert tokenizer.decode(batch.input_ids[row, end]) == "</ref>"
        assert batch.query_words[q].tolist() == tg.expression_classes(expression)
        # nothing between the expression and the query position belongs to another question
        assert int(batch.position_ids[row, position]) - int(batch.position_ids[row, start]) == position - start


def test_pope_questions_are_the_lmms_eval_prompt_answered_yes_or_no_as_the_scene_says(tg, scenes):
    """With --pope-share, POPE blocks are lmms-eval's ``pope`` prompt (checked token for token against the
    processor) answered ``Yes`` / ``No`` as the scene says, supervised on the answer only; the attention losses
    read the object phrase and the object of that colour and shape (none when absent); the share of POPE
    questions is the one asked for, in expectation."""
    from lmms_prune.toy.pope import pope_prompt

    processor = tg.grounder_processor()
    builder = tg.SequenceBuilder(processor, questions_per_object=1, pope_share=0.5)
    for scene in scenes[:3]:
        tg.check_prompt_tokens(builder, scene)
    rng = np.random.default_rng(2)
    asked = 0
    for scene in scenes:
        present = {f"{o.color} {o.shape}" for o in scene.objects}
        order = builder.questions(scene, rng)
        ids, _, blocks = builder.packed(scene, order)
        labels, turns, _ = builder.labels(ids, blocks, [builder.answer_length(scene, q) for q in order])
        for block, question in enumerate(order):
            text, answer = builder.prompt_and_answer(scene, question)
            supervised = [label for label, turn in zip(labels, turns) if turn == block]
            assert processor.tokenizer.decode(supervised) == answer + "<|im_end|>"
            if question.is_pope:
                asked += 1
                article = "an" if question.expression[0] in "aeiou" else "a"
                assert text == pope_prompt(f"Is there {article} {question.expression} in the image?")
                assert answer == ("Yes" if question.expression in present else "No"), (question, present)
                named = scene.objects[question.object] if question.object >= 0 else None
                assert (named is not None) == (question.expression in present)
                assert named is None or f"{named.color} {named.shape}" == question.expression
            else:
                assert answer.startswith("<box>[[")
    assert asked > 0
    batch = builder.batch(scenes, rng)
    grounding_answers = int((batch.labels == builder.box_id).sum())
    assert batch.n_pope == batch.n_questions - grounding_answers > 0
    # every answer token is a query; a POPE query's expression span is its object phrase, in its own block
    assert len(batch.query_rows) == int((batch.labels != tg.IGNORE).sum())
    tokenizer = processor.tokenizer
    for q in range(len(batch.query_rows)):
        row, position = int(batch.query_rows[q]), int(batch.query_positions[q])
        start, end = batch.query_text[q].tolist()
        phrase = tokenizer.decode(batch.input_ids[row, start:end]).strip()
        if tokenizer.decode(batch.input_ids[row, start - 1]) != "<ref>":  # a POPE question
            assert tokenizer.decode(batch.input_ids[row, start - 3 : start]).startswith("Is there")
            assert batch.query_words[q].tolist() == tg.expression_classes("the " + phrase)
            objects = [f"{o.color} {o.shape}" for o in scenes[row].objects]
            k = int(batch.query_objects[q])
            assert (objects[k] == phrase) if k >= 0 else (phrase not in objects)
        assert int(batch.position_ids[row, position]) - int(batch.position_ids[row, start]) == position - start
    shares = []
    for _ in range(20):
        orders = [builder.questions(s, rng) for s in scenes]
        shares.append(sum(q.is_pope for o in orders for q in o) / sum(len(o) for o in orders))
    assert abs(float(np.mean(shares)) - 0.5) < 0.06  # capped a little by scenes with few distinct objects
    with pytest.raises(ValueError, match="pope_share=1.0"):
        tg.SequenceBuilder(processor, pope_share=1.0)


def test_box_answer_is_internvl_format_on_the_0_1000_grid(tg):
    assert tg.box_answer((0, 112, 224, 448), 448, 448) == "<box>[[0, 250, 500, 1000]]</box>"


def test_two_runs_with_one_seed_give_identical_weights(tg, tmp_path):
    """Deterministic for a seed: the whole pipeline (data, init, losses, optimiser, EMA, save) twice."""
    digests = []
    for run in ("a", "b"):
        out = tmp_path / run
        args = ["--seed", "3", "--steps", "3", "--batch", "1", "--eval-images", "1", "--threads", "1",
                "--vision-steps", "1", "--vision-batch", "1", "--pope-share", "0.5", "--out", str(out)]
        metrics = tg.main(args)
        assert metrics["steps_done"] == 3 and not metrics["stopped_by_time_cap"]
        assert metrics["pope_questions_seen"] > 0 and metrics["heldout_pope_questions"] >= 2
        assert (out / "loss.png").stat().st_size > 0 and (out / "metrics.json").is_file()
        digests.append(hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest())
    assert digests[0] == digests[1]
    # continued training (--init) starts from the saved weights: zero learning rate leaves them as they were
    tg.main(["--init", str(tmp_path / "a"), "--steps", "1", "--batch", "1", "--lr", "0", "--eval-images", "1",
             "--threads", "1", "--pope-share", "0.5", "--out", str(tmp_path / "c")])
    assert hashlib.sha256((tmp_path / "c" / "model.safetensors").read_bytes()).hexdigest() == digests[0]


def test_block_mask_shows_each_question_the_image_and_itself_only(tg):
    blocks = torch.tensor([[-1, -1, -1, 0, 0, 1, 1, 1, tg.PAD_BLOCK]])
    mask = tg.block_attention_mask(blocks)[0, 0]
    seen = mask == 0
    for i in range(blocks.shape[1]):
        for j in range(blocks.shape[1]):
            same = int(blocks[0, i]) == int(blocks[0, j])
            expected = j <= i and (int(blocks[0, j]) == -1 or same)
            assert bool(seen[i, j]) == expected, (i, j)
    assert float(mask.min()) == torch.finfo(torch.float32).min


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_packed_questions_equal_their_single_turn_sequences(tg, scenes, implementation):
    """The logits of every question block of a packed row (shared image prefix, block mask, restarted
    positions) equal those of the question's own single-turn sequence, so training sees exactly the
    evaluation prompt; with a plain causal mask instead (later blocks seeing earlier ones) they would not."""
    builder = tg.SequenceBuilder(tg.grounder_processor(), questions_per_object=2, pope_share=0.5)
    model = tg.build_model(0, text_hidden=32, text_intermediate=64).eval()
    model.set_attn_implementation(implementation)
    scene = scenes[0]
    order = builder.questions(scene, np.random.default_rng(1))
    assert len(order) >= 4 and any(q.is_pope for q in order) and not all(q.is_pope for q in order)
    ids, positions, blocks = builder.packed(scene, order)
    pixels, _ = builder.images([scene])
    with torch.no_grad():
        packed = model(input_ids=torch.tensor([ids]), position_ids=torch.tensor([positions]), pixel_values=pixels,
                       attention_mask=tg.block_attention_mask(torch.tensor([blocks]))).logits[0]
        causal = model(input_ids=torch.tensor([ids]), pixel_values=pixels).logits[0]
        for block in range(len(order)):
            seen = [k for k, b in enumerate(blocks) if b in (-1, block)]
            single = model(input_ids=torch.tensor([[ids[k] for k in seen]]), pixel_values=pixels).logits[0]
            torch.testing.assert_close(packed[seen], single, rtol=1e-4, atol=1e-4)
            if block > 0:
                assert float((causal[seen] - single).abs().max()) > 1e-3


def test_expression_classes_say_what_the_expression_says(tg, scenes):
    decoded_any = set()
    for scene in list(generate_scenes(40, 5, **SCENE_KWARGS)) + scenes:
        for index, obj in enumerate(scene.objects):
            for expression in tg.referring_expressions(index, scene.objects, tg.TRAIN_EXPRESSIONS):
                classes = tg.expression_classes(expression)
                values = [options[c] for (_, options), c in zip(tg.EXPRESSION_FIELDS, classes)]
                colour, shape, superlative, relation, anchor_colour, anchor_shape = values
                anchor = Description(anchor_shape, anchor_colour) if relation else None
                rebuilt = Description(shape, colour, superlative, (relation, anchor) if relation else None)
                assert rebuilt == parse_expression(expression), expression
                assert shape == obj.shape and colour in (None, obj.color)
                decoded_any.update(name for (name, _), v in zip(tg.EXPRESSION_FIELDS, values) if v is not None)
    assert decoded_any == {name for name, _ in tg.EXPRESSION_FIELDS}  # every field occurs


def test_grounder_tokenizer_keeps_every_grammar_word_whole(tg):
    tokenizer = grounder_tokenizer()
    words = {w for line in grounding_corpus() for w in line.replace(",", " ").replace(".", " ").split()}
    assert {"purple", "hexagon", "leftmost", "orange", "diamond", "below"} <= words
    for word in words:
        assert len(tokenizer(" " + word, add_special_tokens=False).input_ids) == 1, word
    # the digits stay one per token, as the 0-1000 answers need
    assert len(tokenizer("1000", add_special_tokens=False).input_ids) == 4
    # special tokens keep the ids the config was built with
    processor = tg.grounder_processor()
    assert processor.tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>") == tg.grounder_config().image_token_id
    assert tg.grounder_config().text_config.vocab_size == len(tokenizer)


def test_query_attention_recorder_equals_eager_attention_maps(tg, scenes):
    """The training attention function (SDPA plus the supervised heads' rows at the answer positions) gives the
    same probabilities, losses and gradients as eager attention's full maps, and the same model outputs; a
    recorder that read the wrong head or row would not."""
    builder = tg.SequenceBuilder(tg.grounder_processor(), questions_per_object=2)
    model = tg.build_model(0, text_hidden=32, text_intermediate=64).train()
    with torch.no_grad():  # peaked attention, so that heads and rows differ clearly (random init is ~uniform)
        for layer in model.model.language_model.layers:
            layer.self_attn.q_proj.weight.mul_(8.0)
            layer.self_attn.k_proj.weight.mul_(8.0)
    batch = builder.batch(scenes[:3], np.random.default_rng(4))
    inputs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                  pixel_values=batch.pixel_values, labels=batch.labels)

    def losses_and_grads(probs, out):
        total = (out.loss + tg.attention_loss(probs, batch, model.config.image_token_id)
                 + tg.text_attention_loss(probs, batch))
        model.zero_grad(set_to_none=True)
        total.backward()
        return total.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.set_attn_implementation("eager")
    eager_out = model(**inputs, output_attentions=True)
    eager_probs = {layer: eager_out.attentions[layer][batch.query_rows, head, batch.query_positions]
                   for layer, head in tg.SUPERVISED_HEADS.items()}
    eager_total, eager_grads = losses_and_grads(eager_probs, eager_out)

    recorder = tg.use_query_attention(model)
    assert model.config.text_config._attn_implementation == tg.ATTENTION_NAME
    recorder.arm(batch.query_rows, batch.query_positions)
    out = model(**inputs)
    recorder.disarm()
    assert set(recorder.probs) == set(tg.SUPERVISED_HEADS) == set(range(tg.TEXT_LAYERS))
    for layer, probs in recorder.probs.items():
        assert probs.shape == (len(batch.query_rows), batch.input_ids.shape[1])
        torch.testing.assert_close(probs, eager_probs[layer], rtol=1e-5, atol=1e-6)
        other_head = eager_out.attentions[layer][batch.query_rows, 1, batch.query_positions]
        assert float((probs - other_head).detach().abs().max()) > 1e-2
    torch.testing.assert_close(out.logits, eager_out.logits, rtol=1e-4, atol=1e-5)
    total, grads = losses_and_grads(recorder.probs, out)
    torch.testing.assert_close(total, eager_total, rtol=1e-5, atol=1e-5)
    assert grads.keys() == eager_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, eager_grads[name], rtol=1e-3, atol=1e-5, msg=name)

    # Disarmed (generation, evaluation) it is plain SDPA and records nothing new.
    recorder.probs = {}
    with torch.no_grad():
        model(**inputs)
    assert recorder.probs == {}


def test_absent_objects_are_pointed_at_the_closing_image_token_with_absent_target_sink(tg, scenes):
    """``--absent-target sink``: a POPE question about an absent object is taught to look at its row's ``</img>``
    (and at nothing without it); the questions about present objects keep their cell targets, each query
    weighing alike. Attention that puts all its mass where each target is costs nothing, and moving an absent
    question's mass from the sink to the image costs ``-log(1e-6)`` for it."""
    from lmms_prune.toy.tokenizers import LLAMA_SPECIAL_IDS

    builder = tg.SequenceBuilder(tg.grounder_processor(), questions_per_object=1, pope_share=0.5)
    batch = builder.batch(scenes[:4], np.random.default_rng(5))
    absent = batch.query_objects < 0
    assert bool(absent.any()) and bool((~absent).any())
    image_id = tg.grounder_config().image_token_id
    sink_id = LLAMA_SPECIAL_IDS["</img>"]
    n_rows, length = batch.input_ids.shape
    visual = (batch.input_ids == image_id).nonzero()[:, 1].view(n_rows, -1)
    perfect = torch.zeros(len(batch.query_rows), length)
    for q in range(len(batch.query_rows)):
        row = int(batch.query_rows[q])
        if absent[q]:
            perfect[q, int((batch.input_ids[row] == sink_id).nonzero()[0, 0])] = 1.0
        else:  # every cell the target holds, in equal shares (cells of the object, or the edge's cells)
            obj, part = int(batch.query_objects[q]), int(batch.query_parts[q])
            cells = batch.cells.edges[row, obj, part] if part >= 0 else batch.cells.cells[row, obj]
            perfect[q, visual[row][cells]] = 1.0 / int(cells.sum())
    probs = {layer: perfect for layer in tg.ATTENTION_LAYERS}
    assert float(tg.attention_loss(probs, batch, image_id, sink_id)) == pytest.approx(0.0, abs=1e-4)
    assert float(tg.attention_loss(probs, batch, image_id)) == pytest.approx(0.0, abs=1e-4)  # absent: no target
    moved = perfect.clone()
    moved[absent] = 0.0
    moved[absent, int(visual[0, 0])] = 1.0  # every absent question looks at an image cell instead
    probs = {layer: moved for layer in tg.ATTENTION_LAYERS}
    share = float(absent.float().mean())
    assert float(tg.attention_loss(probs, batch, image_id, sink_id)) == pytest.approx(-np.log(1e-6) * share, rel=1e-3)
    assert float(tg.attention_loss(probs, batch, image_id)) == pytest.approx(0.0, abs=1e-4)  # the old recipe


def test_mme_position_questions_are_the_lmms_eval_prompt_answered_as_the_scene_says(tg, scenes):
    """With --mme-share, MME position blocks are lmms-eval's ``mme`` prompt (checked token for token against the
    processor) answered ``Yes`` / ``No`` as the object's side says (:func:`lmms_prune.toy.mme.side_of`), in pairs
    about one object; the attention losses read the object phrase and the object; the share is the one asked
    for, in expectation, beside POPE questions."""
    from lmms_prune.toy.mme import SIDES, PositionQuestion, mme_prompt, side_of

    processor = tg.grounder_processor()
    builder = tg.SequenceBuilder(processor, questions_per_object=1, pope_share=0.3, mme_share=0.3)
    for scene in scenes[:3]:
        tg.check_prompt_tokens(builder, scene)
    rng = np.random.default_rng(3)
    asked = 0
    for scene in scenes:
        order = builder.questions(scene, rng)
        positions = [q for q in order if q.is_position]
        assert sorted(q.yes for q in positions) == [False] * (len(positions) // 2) + [True] * (len(positions) // 2)
        for question in positions:
            asked += 1
            text, answer = builder.prompt_and_answer(scene, question)
            assert text == mme_prompt(PositionQuestion(question.expression, question.side, answer).question)
            obj = scene.objects[question.object]
            assert f"{obj.color} {obj.shape}" == question.expression
            (axis,) = [ax for ax, sides in SIDES.items() if question.side in sides]
            truth = SIDES[axis][side_of(scene, question.object, axis)]
            assert answer == ("Yes" if question.side == truth else "No") == ("Yes" if question.yes else "No")
    assert asked > 0
    batch = builder.batch(scenes, np.random.default_rng(4))
    tokenizer = processor.tokenizer
    found = 0
    for q in range(len(batch.query_rows)):
        row = int(batch.query_rows[q])
        start, end = batch.query_text[q].tolist()
        if tokenizer.decode(batch.input_ids[row, start - 2 : start]).strip() == "Is the":  # a position question
            found += 1
            obj = scenes[row].objects[int(batch.query_objects[q])]
            assert tokenizer.decode(batch.input_ids[row, start:end]).strip() == f"{obj.color} {obj.shape}"
    assert found > 0
    shares = []
    for _ in range(20):
        orders = [builder.questions(s, rng) for s in scenes]
        shares.append(sum(q.is_position for o in orders for q in o) / sum(len(o) for o in orders))
    assert 0.15 < float(np.mean(shares)) <= 0.33  # capped by scenes with few objects whose side is plain
    with pytest.raises(ValueError, match="mme_share=0.5"):
        tg.SequenceBuilder(processor, pope_share=0.5, mme_share=0.5)
