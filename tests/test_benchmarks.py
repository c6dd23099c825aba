"""The papers' benchmarks read from small files written here in their official schemas, scored against values
computed by hand; the missing-key errors; and `dvlp evaluate benchmark=...` end to end on a tiny saved front."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dvlp_common.config import ConfigError, load_config
from pipelines.cli import main
from pipelines.evaluate import EvaluateConfig, run_evaluate
from tests.conftest import shape_png
from vl_align.benchmarks import (
    BenchmarkConfig,
    read_benchmark,
    read_gqa,
    read_karpathy,
    read_nocaps,
    read_vqa,
    retrieval_gallery,
    score_captions,
    score_gqa,
    score_vqa,
)
from vl_align.metrics import retrieval_recall


def _write(path: Path, data) -> str:
    path.write_text(json.dumps(data))
    return str(path)


def _answers(*counts: tuple[str, int]) -> list[dict]:
    """Ten human answers in the annotation schema, e.g. ("2", 4), ("3", 6)."""
    out = [{"answer": a, "answer_confidence": "yes", "answer_id": 0} for a, n in counts for _ in range(n)]
    assert len(out) == 10
    return [{**a, "answer_id": i + 1} for i, a in enumerate(out)]


def _vqa_files(tmp_path: Path) -> tuple[str, str, Path]:
    """VQAv2 files: 4 questions on 2 COCO val images, named as the official image folder names them."""
    images = tmp_path / "val2014"
    images.mkdir(exist_ok=True)
    for image_id, colour in ((42, (255, 0, 0)), (7, (0, 0, 255))):
        (images / f"COCO_val2014_{image_id:012d}.jpg").write_bytes(shape_png(colour, "square"))
    questions = {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": "val2014",
                 "questions": [{"image_id": 42, "question": "How many squares?", "question_id": 420},
                               {"image_id": 42, "question": "How many circles?", "question_id": 421},
                               {"image_id": 7, "question": "Is it red?", "question_id": 70},
                               {"image_id": 7, "question": "What colour is it?", "question_id": 71}]}
    annotations = {"info": {}, "annotations": [
        # an annotation of a question not in the questions file is not used
        {"question_id": 999, "image_id": 7, "answers": _answers(("x", 10)), "answer_type": "other",
         "question_type": "what", "multiple_choice_answer": "x"},
        {"question_id": 420, "image_id": 42, "answers": _answers(("2", 4), ("3", 3), ("4", 3)),
         "answer_type": "number", "question_type": "how many", "multiple_choice_answer": "2"},
        {"question_id": 421, "image_id": 42, "answers": _answers(("2", 3), ("3", 7)),
         "answer_type": "number", "question_type": "how many", "multiple_choice_answer": "3"},
        {"question_id": 70, "image_id": 7, "answers": _answers(("yes", 1), ("no", 9)),
         "answer_type": "yes/no", "question_type": "is it", "multiple_choice_answer": "no"},
        {"question_id": 71, "image_id": 7, "answers": _answers(("blue", 10)),
         "answer_type": "other", "question_type": "what color is the", "multiple_choice_answer": "blue"},
    ]}
    return (_write(tmp_path / "v2_questions.json", questions), _write(tmp_path / "v2_annotations.json", annotations),
            images)


def test_vqav2_reader_and_official_accuracy(tmp_path):
    questions, annotations, images = _vqa_files(tmp_path)
    items = read_vqa(questions, annotations, str(images))
    assert [q.question_id for q in items] == [420, 421, 70, 71]  # the questions file's order
    assert items[0].image_path == str(images / "COCO_val2014_000000000042.jpg")
    assert items[0].answers == ("2",) * 4 + ("3",) * 3 + ("4",) * 3 and items[2].answer_type == "yes/no"

    scores = score_vqa(items, ["two", "Two.", "Yes", "red"])
    # Official accuracy: mean over the 10 leave-one-out sets of 9 humans of min(#matches in the set / 3, 1); the
    # prediction is normalised first ("two" -> "2", "Two." -> "2", "Yes" -> "yes"). With m of the 10 answers equal:
    #   420, "2" x4: every set keeps >= 3 matches                          -> 1.0
    #   421, "2" x3: 3 sets drop a "2" (2/3), 7 keep all three (1)         -> (3 * 2/3 + 7 * 1) / 10 = 0.9
    #   70,  "yes" x1: the set without it has 0, the 9 others 1/3          -> 9 * (1/3) / 10 = 0.3
    #   71,  "red" never given                                             -> 0.0
    assert scores["vqa"]["accuracy"] == pytest.approx((1.0 + 0.9 + 0.3 + 0.0) / 4)
    assert scores["vqa_by_answer_type"] == pytest.approx({"number": 0.95, "yes/no": 0.3, "other": 0.0})
    assert scores["answer_type_counts"] == {"number": 2, "other": 1, "yes/no": 1}

    # OK-VQA ships in the same schema and reads through the same path; a custom image naming applies
    bench = BenchmarkConfig(questions=questions, annotations=annotations, images=str(images),
                            image_pattern="COCO_val2014_{image_id:012d}.jpg")
    assert read_benchmark("okvqa", bench) == items
    # test-dev: questions without annotations, nothing to score
    assert read_vqa(questions, None, str(images))[0].answers == ()


def test_gqa_reader_and_exact_match(tmp_path):
    data = {"201307251": {"imageId": "n161313", "question": "Is the cup to the left or right?", "answer": "left",
                          "fullAnswer": "The cup is to the left of the plate.", "types": {}, "semantic": []},
            "201640614": {"imageId": "n235859", "question": "How many plates?", "answer": "2"},
            "202225914": {"imageId": "n161313", "question": "What animal is it?", "answer": "cat"}}
    items = read_gqa(_write(tmp_path / "testdev_balanced_questions.json", data), str(tmp_path / "images"))
    assert [q.question_id for q in items] == ["201307251", "201640614", "202225914"]
    assert items[0].image_path == str(tmp_path / "images" / "n161313.jpg") and items[1].answers == ("2",)
    # "The left." -> "left" (article and period dropped) and "two" -> "2" match; "dog" does not: 2 of 3
    assert score_gqa(items, ["The left.", "two", "dog"])["vqa"] == {"num_questions": 3, "accuracy": 2 / 3}


def _karpathy_coco(tmp_path: Path) -> str:
    def entry(cocoid, split, sentences):
        return {"filepath": "val2014", "sentids": [], "filename": f"COCO_val2014_{cocoid:012d}.jpg", "imgid": 0,
                "split": split, "sentences": [{"tokens": s.lower().split(), "raw": s, "imgid": 0, "sentid": 0}
                                              for s in sentences], "cocoid": cocoid}
    data = {"dataset": "coco", "images": [
        entry(11, "test", ["A red square on white. ", "A red block."]),
        entry(5, "restval", ["Not in the test split."]),
        entry(3, "test", ["A blue circle on white.", "A blue disc."])]}
    return _write(tmp_path / "dataset_coco.json", data)


def test_karpathy_reader_coco_and_flickr(tmp_path):
    items = read_karpathy(_karpathy_coco(tmp_path), str(tmp_path / "coco"))
    assert [it.image_id for it in items] == [11, 3]  # the test split, file order, cocoid as the id
    assert items[0].image_path == str(tmp_path / "coco" / "val2014" / "COCO_val2014_000000000011.jpg")
    assert items[0].references == ("A red square on white.", "A red block.")  # the raw sentences, stripped
    # Flickr30k's entries have no filepath and no cocoid: the file name under the folder, imgid as the id
    flickr = {"dataset": "flickr30k", "images": [
        {"sentids": [0], "imgid": 0, "split": "test", "filename": "1000092795.jpg",
         "sentences": [{"tokens": ["two", "dogs"], "raw": "Two dogs play.", "imgid": 0, "sentid": 0}]}]}
    items = read_karpathy(_write(tmp_path / "dataset_flickr30k.json", flickr), str(tmp_path / "flickr"))
    assert items[0].image_id == 0 and items[0].image_path == str(tmp_path / "flickr" / "1000092795.jpg")
    with pytest.raises(ConfigError, match="bench.split.*no image of split 'val'"):
        read_karpathy(str(tmp_path / "dataset_flickr30k.json"), str(tmp_path), split="val")


def _nocaps(tmp_path: Path) -> str:
    images = [{"id": i, "file_name": f"{i:04x}.jpg", "open_images_id": f"{i:04x}", "height": 16, "width": 16,
               "coco_url": "", "date_captured": "", "license": 0, "domain": d}
              for i, d in enumerate(["in-domain", "out-domain", "in-domain", "out-domain"])]
    refs = ["red bus parked outside station", "small boat crossing harbour",
            "two cats sleeping together indoors", "green tractor ploughing field"]
    annotations = [{"image_id": i, "id": 100 + i, "caption": c} for i, c in enumerate(refs)]
    return _write(tmp_path / "nocaps_val_4500_captions.json", {"licenses": [], "info": {}, "images": images,
                                                               "annotations": annotations})


def test_nocaps_reader_and_per_domain_scores(tmp_path):
    items = read_nocaps(_nocaps(tmp_path), str(tmp_path / "nocaps"))
    assert [(it.image_id, it.domain) for it in items] == [(0, "in-domain"), (1, "out-domain"), (2, "in-domain"),
                                                         (3, "out-domain")]
    assert items[1].image_path == str(tmp_path / "nocaps" / "0001.jpg")
    # in-domain: each prediction is its one reference; out-domain: no word in common with its reference
    predictions = [items[0].references[0], "purple elephant dancing", items[2].references[0], "violin on stage"]
    scores = score_captions(items, predictions, meteor=False)
    assert set(scores) == {"captioning", "captioning_in-domain", "captioning_out-domain"}
    # CIDEr-D of a caption equal to its single reference is 10 (cosine 1 for every n = 1..4, no length penalty,
    # x10), whatever the IDF weights, as long as its n-grams are not in every reference of the set (here no word
    # repeats between images); no shared n-gram scores 0. ROUGE-L: 1 and 0.
    assert scores["captioning_in-domain"]["CIDEr"] == pytest.approx(10.0)
    assert scores["captioning_in-domain"]["ROUGE_L"] == pytest.approx(1.0)
    assert scores["captioning_in-domain"]["Bleu_4"] == pytest.approx(1.0, abs=1e-6)
    assert scores["captioning_out-domain"]["CIDEr"] == 0.0 and scores["captioning_out-domain"]["ROUGE_L"] == 0.0
    assert scores["captioning_out-domain"]["Bleu_1"] < 1e-6
    # all four images: the mean of 10, 0, 10, 0
    assert scores["captioning"]["CIDEr"] == pytest.approx(5.0) and scores["captioning"]["num_images"] == 4
    assert scores["captioning"]["ROUGE_L"] == pytest.approx(0.5)


def test_retrieval_ground_truth_is_the_sentences_own_image():
    from vl_align.benchmarks import CaptionItem

    items = [CaptionItem(1, "a.jpg", ("a dog runs", "same words")), CaptionItem(2, "b.jpg", ("same words", "a cat"))]
    gallery = retrieval_gallery(items)
    assert gallery.texts == ["a dog runs", "same words", "same words", "a cat"]  # equal sentences stay two texts
    assert gallery.gold.tolist() == [[True, True, False, False], [False, False, True, True]]
    # image 1's best text is text 0, its own: a hit. Image 2's best is text 1, image 1's "same words": a miss, though
    # image 2 has the same words too. Text->image: texts 0, 2, 3 find their own image first, text 1 finds image 2.
    sims = torch.tensor([[0.9, 0.1, 0.0, 0.2],
                         [0.3, 0.8, 0.5, 0.4]])
    rec = retrieval_recall(sims, gold=gallery.gold, ks=(1,))
    assert rec["i2t_r1"] == 0.5 and rec["t2i_r1"] == 0.75
    # caption equality (the embedded evaluation's rule) would have counted both as hits
    equal = torch.tensor([[True, True, True, False], [False, True, True, True]])
    assert retrieval_recall(sims, gold=equal, ks=(1,))["i2t_r1"] == 1.0
    assert len(retrieval_gallery(items, max_images=1).image_ids) == 1


@pytest.mark.parametrize("case", ["annotation_answers", "question_image_id", "no_annotation", "answer_text",
                                  "gqa_answer", "karpathy_raw", "nocaps_domain", "not_json"])
def test_a_missing_key_names_the_file_entry_and_key(tmp_path, case):
    questions, annotations, images = _vqa_files(tmp_path)
    q, a = json.loads(Path(questions).read_text()), json.loads(Path(annotations).read_text())
    if case == "annotation_answers":
        del a["annotations"][1]["answers"]
        _write(Path(annotations), a)
        match = r"bench\.annotations.*v2_annotations\.json: annotations\[1\] \(question_id 420\) has no 'answers'"
    elif case == "question_image_id":
        del q["questions"][2]["image_id"]
        _write(Path(questions), q)
        match = r"bench\.questions.*v2_questions\.json: questions\[2\] \(question_id 70\) has no 'image_id'"
    elif case == "no_annotation":
        q["questions"].append({"image_id": 7, "question": "?", "question_id": 72})
        _write(Path(questions), q)
        match = r"v2_annotations\.json has no annotation of question_id 72 \(questions\[4\]"
    elif case == "answer_text":
        del a["annotations"][3]["answers"][5]["answer"]
        _write(Path(annotations), a)
        match = r"annotations\[3\] \(question_id 70\)\.answers\[5\] has no 'answer'"
    if case in ("annotation_answers", "question_image_id", "no_annotation", "answer_text"):
        with pytest.raises(ConfigError, match=match):
            read_vqa(questions, annotations, str(images))
    elif case == "gqa_answer":
        path = _write(tmp_path / "gqa.json", {"1": {"imageId": "n1", "question": "?", "answer": "a"},
                                              "2": {"imageId": "n2", "question": "?"}})
        with pytest.raises(ConfigError, match=r"gqa\.json: entry 1 \(question id 2\) has no 'answer'"):
            read_gqa(path, str(tmp_path))
    elif case == "karpathy_raw":
        data = json.loads(Path(_karpathy_coco(tmp_path)).read_text())
        del data["images"][2]["sentences"][1]["raw"]
        path = _write(tmp_path / "dataset_coco.json", data)
        with pytest.raises(ConfigError, match=r"bench\.karpathy.*dataset_coco\.json: images\[2\] "
                                              r"\(COCO_val2014_000000000003\.jpg\)\.sentences\[1\] has no 'raw'"):
            read_karpathy(path, str(tmp_path))
    elif case == "nocaps_domain":
        data = json.loads(Path(_nocaps(tmp_path)).read_text())
        del data["images"][3]["domain"]
        path = _write(tmp_path / "nocaps.json", data)
        with pytest.raises(ConfigError, match=r"bench\.captions.*nocaps\.json: images\[3\] \(id 3\) has no 'domain'"):
            read_nocaps(path, str(tmp_path))
    else:
        Path(questions).write_text("{not json")
        with pytest.raises(ConfigError, match=r"bench\.questions.*v2_questions\.json is not JSON"):
            read_vqa(questions, annotations, str(images))


def test_the_config_names_the_missing_or_unread_file_key():
    with pytest.raises(ConfigError, match=r"bench\.questions.*benchmark=vqav2 needs it"):
        load_config(EvaluateConfig, None, ["benchmark=vqav2", "bench.images=/x"])
    with pytest.raises(ConfigError, match=r"bench\.karpathy.*benchmark=gqa does not read it"):
        load_config(EvaluateConfig, None, ["benchmark=gqa", "bench.questions=q", "bench.images=i",
                                           "bench.karpathy=k"])
    with pytest.raises(ConfigError, match=r"bench\.questions.*read only by a benchmark"):
        load_config(EvaluateConfig, None, ["bench.questions=q"])
    with pytest.raises(ConfigError, match=r"eval\.questions_source.*reads bench"):
        load_config(EvaluateConfig, None, ["benchmark=nocaps", "bench.captions=c", "bench.images=i",
                                           "eval.questions_source=q.jsonl"])
    with pytest.raises(ConfigError, match=r"benchmark.*allowed values"):
        load_config(EvaluateConfig, None, ["benchmark=vqa3"])
    # the embedded default stays the default
    assert load_config(EvaluateConfig, None, []).benchmark == "embedded"


@pytest.fixture(scope="module")
def tiny_front(tmp_path_factory, tiny_vit_dir, tiny_bert_dir, tiny_llm_dir):
    """An untrained Q-Former front saved as a stage-2 run saves it: what `dvlp evaluate front=...` loads."""
    from vl_align.fronts import FrontConfig, build_front, save_front
    from vl_align.vision import VisionTowerConfig

    torch.manual_seed(0)
    cfg = FrontConfig(kind="qformer", init_from=tiny_bert_dir, num_query_tokens=4)
    out = tmp_path_factory.mktemp("bench_front") / "front"
    save_front(build_front(cfg, vision_width=32, llm_hidden_size=32), out, cfg,
               VisionTowerConfig(model=tiny_vit_dir, image_size=16), llm=tiny_llm_dir, bos_before_prefix=True)
    return str(out)


def test_dvlp_evaluate_benchmark_vqav2_end_to_end(tmp_path, tiny_front, capsys):
    questions, annotations, images = _vqa_files(tmp_path)
    out = tmp_path / "eval"
    rc = main(["evaluate", f"front={tiny_front}", "benchmark=vqav2", f"bench.questions={questions}",
               f"bench.annotations={annotations}", f"bench.images={images}", "bench.length_penalty=0",
               "eval.num_beams=2", "eval.max_new_tokens=3", "eval.max_questions=null", "precision=fp32",
               f"output_dir={out}"])
    assert rc == 0, capsys.readouterr().err
    scores = json.loads((out / "eval.json").read_text())
    preds = json.loads((out / "predictions.json").read_text())
    assert [p["question_id"] for p in preds] == [420, 421, 70, 71]
    # the reported scores are those of the predictions written beside them
    items = read_vqa(questions, annotations, str(images))
    again = score_vqa(items, [p["prediction"] for p in preds])
    assert scores["vqa"] == pytest.approx(again["vqa"]) and scores["vqa"]["num_questions"] == 4
    assert scores["vqa_by_answer_type"] == pytest.approx(again["vqa_by_answer_type"])
    assert scores["protocol"]["num_beams"] == 2 and scores["protocol"]["length_penalty"] == 0.0
    # the evaluation server's format
    assert json.loads((out / "results.json").read_text()) == [{"question_id": p["question_id"],
                                                               "answer": p["prediction"]} for p in preds]
    # a missing image is named, before any model runs
    (images / "COCO_val2014_000000000007.jpg").unlink()
    rc = main(["evaluate", f"front={tiny_front}", "benchmark=vqav2", f"bench.questions={questions}",
               f"bench.images={images}", "precision=fp32", f"output_dir={out}"])
    assert rc == 2 and "COCO_val2014_000000000007.jpg" in capsys.readouterr().err


def test_run_evaluate_captioning_and_retrieval_on_karpathy(tmp_path, tiny_front):
    karpathy = _karpathy_coco(tmp_path)
    (tmp_path / "coco" / "val2014").mkdir(parents=True)
    for cocoid, colour in ((11, (255, 0, 0)), (3, (0, 0, 255))):
        (tmp_path / "coco" / "val2014" / f"COCO_val2014_{cocoid:012d}.jpg").write_bytes(shape_png(colour, "circle"))
    common = [f"front={tiny_front}", f"bench.karpathy={karpathy}", f"bench.images={tmp_path / 'coco'}",
              "precision=fp32", "eval.max_new_tokens=4", "eval.meteor=false"]
    result = run_evaluate(load_config(EvaluateConfig, None, common + ["benchmark=coco_caption",
                                                                       f"output_dir={tmp_path / 'cap'}"]))
    assert result["captioning"]["num_images"] == 2 and "CIDEr" in result["captioning"]
    results = json.loads((tmp_path / "cap" / "results.json").read_text())
    assert [r["image_id"] for r in results] == [3, 11]  # the first images by id, COCO's results format

    result = run_evaluate(load_config(EvaluateConfig, None, common + ["benchmark=coco_retrieval", "bench.k=2",
                                                                       f"output_dir={tmp_path / 'ret'}"]))
    assert result["gallery"]["num_images"] == 2 and result["gallery"]["num_texts"] == 4
    assert result["gallery"]["num_correct_pairs"] == 4  # each sentence is correct for its own image only
    assert all(0.0 <= v <= 1.0 for v in result["itm_rerank"].values())
    assert result["itc"]["i2t_r10"] == 1.0  # a gallery of 4 texts: everything is in the top 10
    assert "the Karpathy split's protocol" in (tmp_path / "ret" / "retrieval.md").read_text()


def test_an_image_pattern_field_the_entries_lack_is_named(tmp_path):
    questions, annotations, images = _vqa_files(tmp_path)
    with pytest.raises(ConfigError, match=r"bench\.image_pattern.*'\{imgid\}\.jpg' names 'imgid'.*questions\[0\]"):
        read_vqa(questions, annotations, str(images), image_pattern="{imgid}.jpg")


def test_the_length_penalty_reaches_beam_search_only(tiny_llm_dir):
    """LAVIS's VQA decoding (beam 5, length_penalty 0 or -1) needs the penalty to reach transformers' generate; with
    one beam it has no meaning and is not passed (transformers warns about it)."""
    from pformer.llm import FrozenLLM

    llm = FrozenLLM.load(tiny_llm_dir)
    seen = []
    real = llm.model.generate

    def spy(**kwargs):
        seen.append(kwargs.get("length_penalty"))
        return real(**kwargs)

    llm.model.generate = spy
    prefix = torch.randn(2, 4, llm.hidden_size)
    for beams in (5, 1):
        out = llm.generate(prefix, prompts=["Question: what? Short answer:"] * 2, max_new_tokens=3, num_beams=beams,
                           length_penalty=-1.0, min_new_tokens=1)
        assert len(out) == 2
    assert seen == [-1.0, None]
