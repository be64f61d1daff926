import pytest

from ddpm_core.prompts import CLASS_NAMES, PromptError, class_labels, parse_dataset_prompt, parse_prompt


@pytest.mark.parametrize(
    "prompt,classes",
    [
        ("7", [7]),
        ("seven", [7]),
        ("Seven ", [7]),
        ("  SEVEN\t", [7]),
        ("3 1 4", [3, 1, 4]),
        ("3,1,4", [3, 1, 4]),
        ("three, One  FOUR", [3, 1, 4]),
        ("0 zero 9 nine", [0, 0, 9, 9]),
        ("1 1 1", [1, 1, 1]),
    ],
)
def test_digits_and_words_in_any_case(prompt, classes):
    assert parse_prompt(prompt) == classes


@pytest.mark.parametrize(
    "prompt,bad", [("eleven", "eleven"), ("3 sevn", "sevn"), ("10", "10"), ("-1", "-1"), ("37", "37"), ("٣", "٣")]
)
def test_unknown_word_is_one_line_listing_the_accepted_words(prompt, bad):
    with pytest.raises(PromptError) as info:
        parse_prompt(prompt)
    message = str(info.value)
    assert "\n" not in message
    assert f"'{bad}'" in message
    assert "0-9 or zero, one, two, three, four, five, six, seven, eight, nine" in message


@pytest.mark.parametrize("prompt", ["", "   ", " , "])
def test_empty_prompt_is_refused(prompt):
    with pytest.raises(PromptError, match="empty prompt"):
        parse_prompt(prompt)


def test_names_with_spaces_match_the_longest_name():
    # The shape of Fashion-MNIST's table: multi-word names, one a prefix of another.
    names = ("t-shirt/top", "trouser", "bag", "ankle boot", "ankle")
    assert parse_prompt("Ankle  Boot, bag ankle 1", names) == [3, 2, 4, 1]
    assert parse_prompt("T-shirt/top ankle boot", names) == [0, 3]
    with pytest.raises(PromptError, match="'boot'"):
        parse_prompt("boot", names)


def test_mnist_names_are_the_ten_digits():
    assert len(CLASS_NAMES["mnist"]) == 10
    assert parse_prompt(" ".join(CLASS_NAMES["mnist"])) == list(range(10))


FASHION = CLASS_NAMES["fashion-mnist"]


@pytest.mark.parametrize(
    "prompt,classes",
    [
        ("Ankle Boot", [9]),
        ("t-shirt/top", [0]),
        ("T-Shirt/Top, ankle boot,bag", [0, 9, 8]),
        ("sneaker, 8 Sandal  shirt", [7, 8, 5, 6]),
        ("shirt t-shirt", [6, 0]),
        ("t shirt, tshirt top", [0, 0, 0]),
        ("ankle-boot boot trousers", [9, 9, 1]),
    ],
)
def test_fashion_names_and_aliases(prompt, classes):
    assert parse_dataset_prompt(prompt, "fashion-mnist") == classes


def test_fashion_unknown_word_lists_the_fashion_names():
    with pytest.raises(PromptError) as info:
        parse_dataset_prompt("bag, seven", "fashion-mnist")
    assert str(info.value) == (
        "unknown class 'seven'; accepted: 0-9 or t-shirt/top, trouser, pullover, dress, coat, sandal, shirt, sneaker, bag, ankle boot"
    )
    with pytest.raises(PromptError, match="'ankle'"):
        parse_dataset_prompt("ankle", "fashion-mnist")


def test_figures_label_digits_as_digits_and_clothes_by_name():
    assert class_labels("mnist") == [str(i) for i in range(10)]
    assert class_labels("fashion-mnist") == list(FASHION)
    assert parse_dataset_prompt(" ".join(FASHION), "fashion-mnist") == list(range(10))
